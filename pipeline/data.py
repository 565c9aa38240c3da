"""Datasets → Parquet manifests.

A manifest (one per split) lists images: id, location relative to a declared
image root, content hash, reference captions, and attributes (JSON) when the
source knows them. The root is stored symbolically (``package:easy_vqa``,
``params:prepare.folder`` or ``params:prepare.test_folder``), never as a machine path,
so the same data gives byte-identical manifests on any machine. VQA sources add a
questions table. Sources and their files: docs/datasets.md.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import shards
from pipeline.config import PrepareConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.io import atomic_path, sha256_file

EASYVQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")

IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),  # relative to the manifest's image_root
        ("image_sha256", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("attributes", pa.string()),  # JSON object, e.g. {"color": "blue", "shape": "circle"}
    ]
)
QUESTION_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("image_id", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),  # VQAv2: the ten human answers; easy-VQA: one
        ("question_type", pa.string()),  # VQAv2's question_type ("what color is the"); "" where unknown
        ("answer_type", pa.string()),  # VQAv2's answer_type ("yes/no", "number", "other"); "" where unknown
    ]
)


@dataclass
class Split:
    name: str
    image_root: str  # symbolic root, resolved by resolve_image_root
    images: list[dict]  # rows of IMAGE_SCHEMA
    questions: list[dict] = field(default_factory=list)  # rows of QUESTION_SCHEMA


@dataclass(frozen=True)
class Role:
    """Which params keys name a source's files: the training source's (prepare.folder, ...) or the
    evaluation source's (prepare.test_folder, ...), so messages name the key the user set and the
    manifests the root they must be resolved against."""

    prefix: str = ""

    def key(self, name: str) -> str:
        return f"prepare.{self.prefix}{name}"

    @property
    def root(self) -> str:
        return f"params:{self.key('folder')}"


TRAIN_ROLE, TEST_ROLE = Role(""), Role("test_")


# ---------------------------------------------------------------- roots & paths
def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {module!r} is not installed (run `make setup`)")
    return Path(spec.origin).parent


def resolve_image_root(symbol: str, cfg: PrepareConfig) -> Path:
    kind, _, value = symbol.partition(":")
    if kind == "package":
        return package_dir(value)
    if kind == "params" and value == "prepare.folder":
        return Path(cfg.folder)
    if kind == "params" and value == "prepare.test_folder":
        return Path(cfg.test_folder)
    raise DatasetError(f"manifest image_root {symbol!r} is not a known root")


# ---------------------------------------------------------------- easy-VQA
def easyvqa_attributes(questions: list[tuple[str, str]]) -> dict[str, str]:
    """Colour and shape of one easy-VQA image from its own questions and answers.

    Open questions give a value directly ("what color is the triangle?" -> blue,
    and triangle from the question). Yes/no questions ("is there not a red shape?"
    -> no) give presence (sets the value) or absence (eliminates it; the last
    value left standing is the answer).
    """
    known: dict[str, str] = {}
    excluded: dict[str, set[str]] = {"color": set(), "shape": set()}
    vocab = {"color": EASYVQA_COLORS, "shape": EASYVQA_SHAPES}
    for question, answer in questions:
        words = set(re.findall(r"[a-z]+", question.lower()))
        mentioned = {k: [w for w in v if w in words] for k, v in vocab.items()}
        if answer in ("yes", "no"):
            present = (answer == "yes") != bool(words & {"not", "no"})
            for key, values in mentioned.items():
                for value in values:
                    if present:
                        known[key] = value
                    else:
                        excluded[key].add(value)
            continue
        for key, values in vocab.items():
            if answer in values:
                known[key] = answer
            elif len(mentioned[key]) == 1:
                known[key] = mentioned[key][0]
    for key, values in vocab.items():
        left = [v for v in values if v not in excluded[key]]
        if key not in known and len(left) == 1:
            known[key] = left[0]
    return known


def easyvqa_caption(attributes: dict[str, str]) -> str:
    """'a blue triangle'; an unknown attribute is left out ('a blue shape', 'a triangle')."""
    color = attributes.get("color")
    shape = attributes.get("shape", "shape")
    return f"a {color} {shape}" if color else f"a {shape}"


def load_easyvqa() -> tuple[list[Split], dict]:
    root = package_dir("easy_vqa")
    splits, report = [], {}
    for name in ("train", "test"):
        qs = json.loads((root / "data" / name / "questions.json").read_text())
        image_dir = root / "data" / name / "images"
        by_image: dict[int, list[tuple[str, str]]] = {}
        questions = []
        for index, (question, answer, image_id) in enumerate(qs):
            by_image.setdefault(image_id, []).append((question, answer))
            questions.append(
                {"question_id": f"{name}-{index}", "image_id": str(image_id), "question": question, "answers": [answer],
                 "question_type": "", "answer_type": ""}
            )
        ids = sorted(int(p.stem) for p in image_dir.glob("*.png"))
        counts = {"images": len(ids), "questions": len(questions), "both": 0, "color_only": 0, "shape_only": 0,
                  "neither": 0, "no_questions": 0}
        images = []
        for image_id in ids:
            own = by_image.get(image_id, [])
            attributes = easyvqa_attributes(own)
            if not own:
                counts["no_questions"] += 1
            else:
                counts[{2: "both", 0: "neither"}.get(len(attributes)) or f"{next(iter(attributes))}_only"] += 1
            rel = f"data/{name}/images/{image_id}.png"
            images.append(
                {
                    "image_id": str(image_id),
                    "image_path": rel,
                    "image_sha256": sha256_file(root / rel),
                    "captions": [easyvqa_caption(attributes)] if own else [],
                    "attributes": json.dumps(attributes, sort_keys=True),
                }
            )
        counts["distinct_captions"] = len({c for row in images for c in row["captions"]})
        report[name] = counts
        splits.append(Split(name, "package:easy_vqa", images, questions))
    return splits, report


# ---------------------------------------------------------------- folder of images
def read_caption_rows(folder: Path) -> tuple[Path, list[dict]]:
    csv_path, json_path = folder / "captions.csv", folder / "captions.json"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} (need image, caption[, split])")
            return csv_path, list(reader)
    if json_path.exists():
        try:
            rows = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{json_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image", "caption"} <= r.keys() for r in rows):
            raise DatasetError(f"{json_path}: expected a list of objects with keys image, caption[, split]")
        return json_path, rows
    raise DatasetError(f"{folder}: no captions.csv or captions.json found")


def load_folder(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    if not cfg.folder:
        raise ConfigError(f"params.yaml: {role.key('folder')}: must be set when {role.key('source')} is folder")
    folder = existing_folder(cfg, role)
    source, rows = read_caption_rows(folder)
    images: dict[str, dict] = {}  # image path -> row, in first-seen order
    split_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        rel = str(row["image"]).strip()
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DatasetError(f"{source}: row {line}: image {rel!r} must be a path inside {folder}")
        if rel not in images:
            path = folder / rel
            if not path.is_file():
                raise DatasetError(f"{source}: row {line}: image file {rel} not found")
            images[rel] = {"image_id": rel, "image_path": rel, "image_sha256": sha256_file(path),
                           "captions": [], "attributes": "{}"}
        images[rel]["captions"].append(str(row["caption"]).strip())
        split = (row.get("split") or "").strip()
        if split:
            if split_of.setdefault(rel, split) != split:
                raise DatasetError(f"{source}: row {line}: image {rel} appears in splits {split_of[rel]} and {split}")
    for rel, row in images.items():
        if rel not in split_of:
            split_of[rel] = split_by_content(row["image_sha256"], cfg.test_fraction)
    names = sorted(set(split_of.values()))
    splits = [Split(n, role.root, [r for k, r in images.items() if split_of[k] == n]) for n in names]
    return splits, split_counts(splits)


def existing_folder(cfg: PrepareConfig, role: Role) -> Path:
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise DatasetError(f"{role.key('folder')}: {folder} is not a folder")
    return folder


def split_by_content(image_sha256: str, test_fraction: float) -> str:
    """Deterministic split by content: the same image lands in the same split everywhere."""
    return "test" if int(image_sha256[:8], 16) / 16**8 < test_fraction else "train"


def split_counts(splits: list[Split]) -> dict[str, dict[str, int]]:
    return {s.name: {"images": len(s.images), "captions": sum(len(r["captions"]) for r in s.images)} for s in splits}


# ---------------------------------------------------------------- COCO / Flickr30k (Karpathy split JSON)
def load_karpathy(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Karpathy's split file: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.
    "restval" joins train (as in the usual COCO training set); image paths are relative to prepare.folder."""
    require_keys(cfg, role, "karpathy", "folder", "annotations")
    path, root = Path(cfg.annotations), Path(cfg.folder)
    try:
        entries = json.loads(path.read_text())["images"]
        rows = [(str(Path(e.get("filepath", "")) / e["filename"]), e["split"], [s["raw"].strip() for s in e["sentences"]])
                for e in entries]
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotations file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a Karpathy split file ({type(err).__name__}: {err})") from None
    by_split: dict[str, list[dict]] = {}
    for rel, split, captions in rows:
        if not (root / rel).is_file():
            raise DatasetError(f"{path}: image {rel} not found under {role.key('folder')} {root}")
        by_split.setdefault("train" if split == "restval" else split, []).append(
            {"image_id": rel, "image_path": rel, "image_sha256": sha256_file(root / rel), "captions": captions,
             "attributes": "{}"})
    splits = [Split(name, role.root, images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits)


def require_keys(cfg: PrepareConfig, role: Role, source: str, *names: str) -> None:
    """The params a file source cannot do without, named as the user sets them."""
    if not all(getattr(cfg, n) for n in names):
        keys = " and ".join(role.key(n) for n in names)
        raise ConfigError(f"params.yaml: {keys}: all must be set for {role.key('source')} {source}")


# ---------------------------------------------------------------- webdataset shards (img2dataset)
def load_webdataset(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """Tar shards under prepare.folder named by the brace pattern prepare.shards; split by image hash
    (prepare.test_fraction), as a folder without a split column. Damaged shards are listed, not fatal."""
    require_keys(cfg, role, "webdataset", "folder", "shards")
    folder = existing_folder(cfg, role)
    samples, skipped = shards.list_samples(folder, cfg.shards)
    by_split: dict[str, list[dict]] = {}
    for s in samples:
        by_split.setdefault(split_by_content(s["sha256"], cfg.test_fraction), []).append(
            {"image_id": f"{s['shard']}/{s['key']}", "image_path": f"{s['shard']}/{s['member']}",
             "image_sha256": s["sha256"], "captions": [s["caption"]] if s["caption"] else [], "attributes": "{}"})
    splits = [Split(name, role.root, images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits) | {"skipped": {"count": len(skipped), "items": skipped}}


# ---------------------------------------------------------------- JSON annotation files
def read_json(path: Path, key: str) -> object:
    """A JSON file named by params `key`; a missing or unparsable file is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found ({key})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def field_of(obj: object, name: str, path: Path, where: str, kind: type | tuple[type, ...]) -> object:
    """obj[name] checked for type; otherwise one line naming the file and the field (`images[3].domain`)."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where}: expected an object with field {name!r}, got {type(obj).__name__}")
    if name not in obj:
        raise DatasetError(f"{path}: {where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(f"{path}: {where}.{name}: expected {expected}, got {type(value).__name__}")
    return value


def image_row(root: Path, rel: str, image_id: str, captions: list[str], attributes: dict | None = None) -> dict:
    return {"image_id": image_id, "image_path": rel, "image_sha256": sha256_file(root / rel), "captions": captions,
            "attributes": json.dumps(attributes or {}, sort_keys=True)}


# ---------------------------------------------------------------- CC3M (TSV + img2dataset `files` output)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_cc3m_tsv(path: Path, key: str) -> list[tuple[int, str, str]]:
    """(line, caption, url) of CC3M's TSV (Train_GCC-training.tsv): caption<TAB>image URL, no header;
    the `caption<TAB>url` header img2dataset's instructions add in place is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line, text in enumerate(f, start=1):
                text = text.rstrip("\r\n")
                if not text.strip() or (line == 1 and text.strip().lower() == "caption\turl"):
                    continue
                fields = text.split("\t")
                if len(fields) != 2:
                    raise DatasetError(f"{path}: line {line}: expected 2 tab-separated fields (caption, url), "
                                       f"got {len(fields)}")
                caption, url = fields[0].strip(), fields[1].strip()
                if not caption or not url:
                    raise DatasetError(f"{path}: line {line}: empty {'caption' if not caption else 'url'}")
                rows.append((line, caption, url))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found ({key})") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return rows


def img2dataset_files(folder: Path) -> dict[str, str]:
    """url -> image path (relative to folder) of each image in img2dataset's `files` output
    (<shard>/<key>.jpg beside <key>.json). The sidecar's "url" ties an image to its TSV row whatever
    key scheme the download used; the first image of a URL downloaded twice wins."""
    found: dict[str, str] = {}
    for meta_path in sorted(folder.glob("*/*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{meta_path}: not valid JSON ({err})") from None
        url = field_of(meta, "url", meta_path, "img2dataset metadata", str)
        if meta.get("status", "success") != "success":
            continue
        image = next((p for p in map(meta_path.with_suffix, IMAGE_SUFFIXES) if p.is_file()), None)
        if image is not None:
            found.setdefault(url, image.relative_to(folder).as_posix())
    return found


def load_cc3m(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """CC3M as distributed (caption/URL TSV) with the images img2dataset downloaded beside it. Rows whose
    image is not there (dead links are common) are counted, not fatal; a URL listed twice is one image
    with both captions. Split by image hash (prepare.test_fraction): CC3M has no test split of its own."""
    require_keys(cfg, role, "cc3m", "folder", "annotations")
    folder = existing_folder(cfg, role)
    downloaded = img2dataset_files(folder)
    images: dict[str, dict] = {}  # image path -> row, in TSV order
    missing: list[int] = []
    used: set[str] = set()
    for line, caption, url in read_cc3m_tsv(Path(cfg.annotations), role.key('annotations')):
        rel = downloaded.get(url)
        if rel is None:
            missing.append(line)
            continue
        used.add(url)
        if rel not in images:
            images[rel] = image_row(folder, rel, rel, [])
        images[rel]["captions"].append(caption)
    by_split: dict[str, list[dict]] = {}
    for row in images.values():
        by_split.setdefault(split_by_content(row["image_sha256"], cfg.test_fraction), []).append(row)
    splits = [Split(name, role.root, rows) for name, rows in sorted(by_split.items())]
    report = {"missing": {"count": len(missing), "first_lines": missing[:10]},
              "downloads_not_in_tsv": len(downloaded) - len(used)}
    return splits, split_counts(splits) | report


# ---------------------------------------------------------------- NoCaps (COCO-style JSON)
def load_nocaps(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """NoCaps (nocaps_val_4500_captions.json): {"images": [{"id", "file_name", "domain"}],
    "annotations": [{"image_id", "caption"}]}; images under prepare.folder by file_name. Everything is
    test data; each image keeps its domain (in-/near-/out-domain) in its attributes for per-domain
    CIDEr. The test set's image-info file has no "annotations": its images get no captions."""
    require_keys(cfg, role, "nocaps", "folder", "annotations")
    root, path = existing_folder(cfg, role), Path(cfg.annotations)
    doc = read_json(path, role.key("annotations"))
    images: dict[str, dict] = {}
    for i, entry in enumerate(field_of(doc, "images", path, "top level", list)):
        where = f"images[{i}]"
        image_id = str(field_of(entry, "id", path, where, (int, str)))
        name = field_of(entry, "file_name", path, where, str)
        domain = field_of(entry, "domain", path, where, str)
        if Path(name).is_absolute() or ".." in Path(name).parts or not (root / name).is_file():
            raise DatasetError(f"{path}: {where}.file_name: image {name} not found under {role.key('folder')} {root}")
        images[image_id] = image_row(root, name, image_id, [], {"domain": domain})
    annotations = field_of(doc, "annotations", path, "top level", list) if "annotations" in doc else []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = str(field_of(ann, "image_id", path, where, (int, str)))
        caption = field_of(ann, "caption", path, where, str)
        if image_id not in images:
            raise DatasetError(f"{path}: {where}.image_id: {image_id} is not an image of the file")
        images[image_id]["captions"].append(caption.strip())
    split = Split("test", role.root, list(images.values()))
    report = split_counts([split])
    report["test"]["domains"] = dict(sorted(Counter(json.loads(r["attributes"])["domain"]
                                                    for r in split.images).items()))
    return [split], report


# ---------------------------------------------------------------- VQAv2 (questions + annotations JSON)
def vqav2_image(root: Path, subtype: str, image_id: int) -> str | None:
    """COCO's file name for an image (COCO_val2014_000000000042.jpg), directly under the root or in
    its <subtype>/ folder as the COCO zips unpack; None when neither is there."""
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    return next((rel for rel in (name, f"{subtype}/{name}") if (root / rel).is_file()), None)


def vqav2_answers(path: Path, key: str) -> tuple[dict[str, tuple[list[str], str, str]], str | None]:
    """question_id -> (the human answers, question_type, answer_type) of a VQAv2 annotations file,
    and its data_subtype."""
    doc = read_json(path, key)
    out = {}
    for i, ann in enumerate(field_of(doc, "annotations", path, "top level", list)):
        where = f"annotations[{i}]"
        qid = str(field_of(ann, "question_id", path, where, (int, str)))
        given = field_of(ann, "answers", path, where, list)
        if not given:
            raise DatasetError(f"{path}: {where}.answers: empty")
        answers = [field_of(a, "answer", path, f"{where}.answers[{k}]", str) for k, a in enumerate(given)]
        out[qid] = (answers, field_of(ann, "question_type", path, where, str),
                    field_of(ann, "answer_type", path, where, str))
    return out, doc.get("data_subtype") if isinstance(doc, dict) else None


def load_vqav2(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    """VQAv2: a questions file ({"data_subtype", "questions": [{"question_id", "image_id", "question"}]})
    and its annotations ({"annotations": [{"question_id", "answers": [{"answer"} x10], "question_type",
    "answer_type"}]}); images are COCO's. A train* subtype gives the train split, any other the test
    split. The images get no captions: VQAv2 has none."""
    require_keys(cfg, role, "vqav2", "folder", "annotations", "questions")
    root, q_path, a_path = existing_folder(cfg, role), Path(cfg.questions), Path(cfg.annotations)
    answers_of, a_subtype = vqav2_answers(a_path, role.key('annotations'))
    doc = read_json(q_path, role.key("questions"))
    subtype = field_of(doc, "data_subtype", q_path, "top level", str)
    if a_subtype is not None and a_subtype != subtype:
        raise DatasetError(f"{a_path}: data_subtype {a_subtype!r} differs from the questions file's {subtype!r}")
    questions, image_ids = [], {}
    for i, q in enumerate(field_of(doc, "questions", q_path, "top level", list)):
        where = f"questions[{i}]"
        qid = str(field_of(q, "question_id", q_path, where, (int, str)))
        image_id = field_of(q, "image_id", q_path, where, int)
        text = field_of(q, "question", q_path, where, str)
        if qid not in answers_of:
            raise DatasetError(f"{a_path}: no annotation for question_id {qid} ({q_path}: {where})")
        answers, question_type, answer_type = answers_of[qid]
        questions.append({"question_id": qid, "image_id": str(image_id), "question": text, "answers": answers,
                          "question_type": question_type, "answer_type": answer_type})
        image_ids.setdefault(image_id, where)
    images = []
    for image_id, where in image_ids.items():
        rel = vqav2_image(root, subtype, image_id)
        if rel is None:
            raise DatasetError(f"{q_path}: {where}.image_id: image COCO_{subtype}_{image_id:012d}.jpg not found "
                               f"under {role.key('folder')} {root} (nor in its {subtype}/ folder)")
        images.append(image_row(root, rel, str(image_id), []))
    split = Split("train" if subtype.startswith("train") else "test", role.root, images, questions)
    report = split_counts([split])
    report[split.name] |= {"questions": len(questions),
                           "answer_types": dict(sorted(Counter(q["answer_type"] for q in questions).items()))}
    return [split], report


# ---------------------------------------------------------------- one source, or a training and a test source
LOADERS = {"folder": load_folder, "karpathy": load_karpathy, "webdataset": load_webdataset, "cc3m": load_cc3m,
           "nocaps": load_nocaps, "vqav2": load_vqav2}


def load_one(cfg: PrepareConfig, role: Role = TRAIN_ROLE) -> tuple[list[Split], dict]:
    return load_easyvqa() if cfg.source == "easyvqa" else LOADERS[cfg.source](cfg, role)


def load_source(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """The splits of prepare.source; with prepare.test_source, its test split replaces the training
    source's (train on CC3M, test on NoCaps), and the training source, read with test_fraction 0,
    keeps every image it would have hashed into test."""
    if not cfg.test_source:
        return load_one(cfg)
    splits, report = load_one(replace(cfg, test_fraction=0.0))
    test_cfg = replace(cfg, source=cfg.test_source, folder=cfg.test_folder, annotations=cfg.test_annotations,
                       questions=cfg.test_questions, shards="", test_fraction=1.0, test_source="")
    test_splits, test_report = load_one(test_cfg, TEST_ROLE)
    test = next((s for s in test_splits if s.name == "test"), None)
    if test is None:
        raise DatasetError(f"prepare.test_source {cfg.test_source}: its files give no test split "
                           f"(only {', '.join(s.name for s in test_splits) or 'nothing'})")
    names = {s.name for s in test_splits}
    report = {k: v for k, v in report.items() if k != "test"} | {"test": test_report["test"]}
    report["test_source"] = {"source": cfg.test_source} | {k: v for k, v in test_report.items() if k not in names}
    return sorted([s for s in splits if s.name != "test"] + [test], key=lambda s: s.name), report


# ---------------------------------------------------------------- zero-shot and validation splits
def parse_heldout(heldout: tuple[str, ...], images: list[dict]) -> set[tuple[str, str]]:
    """prepare.heldout entries "<colour> <shape>" -> {(colour, shape)}, checked against the training
    images' labels; every colour and every shape must stay in training with some other partner."""
    labelled = [json.loads(r["attributes"] or "{}") for r in images]
    colors = {a["color"] for a in labelled if "color" in a}
    shapes = {a["shape"] for a in labelled if "shape" in a}
    if not colors or not shapes:
        raise ConfigError("prepare.heldout: needs training images labelled with colour and shape (easy-VQA)")
    pairs = set()
    for i, entry in enumerate(heldout):
        words = entry.split()
        if len(words) != 2 or words[0] not in colors or words[1] not in shapes:
            raise ConfigError(f"prepare.heldout[{i}]: expected '<colour> <shape>' with a colour of "
                              f"{', '.join(sorted(colors))} and a shape of {', '.join(sorted(shapes))}, got {entry!r}")
        pairs.add((words[0], words[1]))
    for value, kind, index in [(c, "colour", 0) for c in colors] + [(s, "shape", 1) for s in shapes]:
        partners = {p[1 - index] for p in pairs if p[index] == value}
        if len(partners) == len(shapes if index == 0 else colors):
            raise ConfigError(f"prepare.heldout: holds out every combination of the {kind} {value!r}; "
                              f"the zero-shot split needs every {kind} seen in training")
    return pairs


def may_be_heldout(attributes: dict, pairs: set[tuple[str, str]]) -> bool:
    """Whether an image could show a held-out combination: its known attributes match one."""
    return any(attributes.get("color", c) == c and attributes.get("shape", s) == s for c, s in pairs)


def hold_out_combinations(splits: list[Split], heldout: tuple[str, ...]) -> dict:
    """The zero-shot split: every training image that may show a held-out colour-shape combination
    leaves training (with its questions); each test image labelled with both attributes gets the
    domain "unseen" (a held-out combination) or "seen". Returns the counts for the report."""
    by_name = {s.name: s for s in splits}
    pairs = parse_heldout(heldout, by_name["train"].images)
    train = by_name["train"]
    kept = [r for r in train.images if not may_be_heldout(json.loads(r["attributes"] or "{}"), pairs)]
    ids = {r["image_id"] for r in kept}
    report = {"heldout": sorted(f"{c} {s}" for c, s in pairs), "train_images_removed": len(train.images) - len(kept)}
    train.images, train.questions = kept, [q for q in train.questions if q["image_id"] in ids]
    domains = {"seen": 0, "unseen": 0}
    for row in by_name.get("test", Split("test", "", [])).images:
        attributes = json.loads(row["attributes"] or "{}")
        if {"color", "shape"} <= attributes.keys():
            domain = "unseen" if (attributes["color"], attributes["shape"]) in pairs else "seen"
            row["attributes"] = json.dumps(attributes | {"domain": domain}, sort_keys=True)
            domains[domain] += 1
    return report | {"test_domains": domains}


def carve_validation(splits: list[Split], fraction: float) -> list[Split]:
    """A validation split of about `fraction` of the training images (by content hash, independent of
    the test split's hash), with their questions; tuning scores on it, never on test."""
    train = next(s for s in splits if s.name == "train")
    chosen = {r["image_id"] for r in train.images if int(r["image_sha256"][8:16], 16) / 16**8 < fraction}
    val = Split("val", train.image_root, [r for r in train.images if r["image_id"] in chosen],
                [q for q in train.questions if q["image_id"] in chosen])
    train.images = [r for r in train.images if r["image_id"] not in chosen]
    train.questions = [q for q in train.questions if q["image_id"] not in chosen]
    return sorted([s for s in splits if s.name != "val"] + [val], key=lambda s: s.name)


def prepare_splits(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """The source's splits, then the zero-shot hold-out and the validation split where params ask."""
    splits, report = load_source(cfg)
    if cfg.heldout:
        report["zero_shot"] = hold_out_combinations(splits, cfg.heldout)
    if cfg.validation_fraction:
        splits = carve_validation(splits, cfg.validation_fraction)
    if cfg.heldout or cfg.validation_fraction:
        report["splits"] = {s.name: {"images": len(s.images), "questions": len(s.questions)} for s in splits}
    return splits, report


# ---------------------------------------------------------------- manifests
def manifest_path(prepared_dir: Path, split: str) -> Path:
    return Path(prepared_dir) / f"{split}.parquet"


def manifest_splits(prepared_dir: Path) -> list[str]:
    """Names of the splits that have a manifest, sorted."""
    return sorted(p.stem for p in Path(prepared_dir).glob("*.parquet") if not p.stem.endswith("_questions"))


def questions_path(prepared_dir: Path, split: str) -> Path:
    return Path(prepared_dir) / f"{split}_questions.parquet"


def write_table(path: Path, rows: list[dict], schema: pa.Schema, metadata: dict[str, str]) -> None:
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_split(prepared_dir: Path, split: Split) -> None:
    meta = {"image_root": split.image_root, "split": split.name}
    write_table(manifest_path(prepared_dir, split.name), split.images, IMAGE_SCHEMA, meta)
    if split.questions:
        write_table(questions_path(prepared_dir, split.name), split.questions, QUESTION_SCHEMA, meta)


@dataclass(frozen=True)
class Manifest:
    split: str
    image_root: str
    images: list[dict]

    @property
    def captions_by_id(self) -> dict[str, list[str]]:
        return {r["image_id"]: r["captions"] for r in self.images}


def read_manifest(prepared_dir: Path, split: str) -> Manifest:
    path = manifest_path(prepared_dir, split)
    if not path.exists():
        raise DatasetError(f"{path}: manifest not found (run the prepare stage first)")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{path}: unreadable Parquet manifest ({err})") from None
    missing = set(IMAGE_SCHEMA.names) - set(table.column_names)
    if missing:
        raise DatasetError(f"{path}: not a manifest (missing columns {', '.join(sorted(missing))})")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return Manifest(split, meta.get("image_root", ""), table.to_pylist())


def has_captions(prepared_dir: Path, split: str) -> bool:
    """Whether any image of the split has a reference caption (VQAv2's images have none)."""
    return any(r["captions"] for r in read_manifest(prepared_dir, split).images)


def has_questions(prepared_dir: Path, split: str) -> bool:
    """Whether the split has a non-empty questions table (a captions-only source has none)."""
    path = questions_path(prepared_dir, split)
    return path.exists() and pq.read_metadata(path).num_rows > 0


def read_questions(prepared_dir: Path, split: str) -> list[dict]:
    path = questions_path(prepared_dir, split)
    if not path.exists():
        raise DatasetError(f"{path}: questions table not found (the prepared source has no VQA questions)")
    return pq.read_table(path).to_pylist()


def read_image_bytes(path: Path) -> bytes:
    """The stored bytes of an image: a file, or a member of a tar shard (`<shard>.tar/<member>`)."""
    member = shards.split_member_path(path)
    return shards.read_member(*member) if member else Path(path).read_bytes()


def load_image(path: Path) -> Image.Image:
    """Decode an image to RGB (a file, or a member of a tar shard: `<shard>.tar/<member>`);
    raises FileNotFoundError when it is not there, OSError/ValueError with the reason if unreadable."""
    member = shards.split_member_path(path)
    with Image.open(io.BytesIO(shards.read_member(*member)) if member else path) as img:
        img.load()
        return img.convert("RGB")
