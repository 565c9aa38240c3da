"""Datasets → Parquet manifests.

A manifest (one per split) lists images: id, location relative to a declared
image root, content hash, reference captions, and attributes (JSON) when the
source knows them. The root is stored symbolically (``package:easy_vqa`` or
``params:prepare.folder``), never as a machine path, so the same data gives
byte-identical manifests on any machine. VQA sources add a questions table.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from dataclasses import dataclass, field
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
        ("answers", pa.list_(pa.string())),
    ]
)


@dataclass
class Split:
    name: str
    image_root: str  # symbolic root, resolved by resolve_image_root
    images: list[dict]  # rows of IMAGE_SCHEMA
    questions: list[dict] = field(default_factory=list)  # rows of QUESTION_SCHEMA


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
                {"question_id": f"{name}-{index}", "image_id": str(image_id), "question": question, "answers": [answer]}
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


def load_folder(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    if not cfg.folder:
        raise ConfigError("params.yaml: prepare.folder: must be set when prepare.source is folder")
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise DatasetError(f"prepare.folder: {folder} is not a folder")
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
    splits = [Split(n, "params:prepare.folder", [r for k, r in images.items() if split_of[k] == n]) for n in names]
    return splits, split_counts(splits)


def split_by_content(image_sha256: str, test_fraction: float) -> str:
    """Deterministic split by content: the same image lands in the same split everywhere."""
    return "test" if int(image_sha256[:8], 16) / 16**8 < test_fraction else "train"


def split_counts(splits: list[Split]) -> dict[str, dict[str, int]]:
    return {s.name: {"images": len(s.images), "captions": sum(len(r["captions"]) for r in s.images)} for s in splits}


# ---------------------------------------------------------------- COCO / Flickr30k (Karpathy split JSON)
def load_karpathy(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """Karpathy's split file: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.
    "restval" joins train (as in the usual COCO training set); image paths are relative to prepare.folder."""
    if not cfg.folder or not cfg.annotations:
        raise ConfigError("params.yaml: prepare.folder and prepare.annotations: both must be set for source karpathy")
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
            raise DatasetError(f"{path}: image {rel} not found under prepare.folder {root}")
        by_split.setdefault("train" if split == "restval" else split, []).append(
            {"image_id": rel, "image_path": rel, "image_sha256": sha256_file(root / rel), "captions": captions,
             "attributes": "{}"})
    splits = [Split(name, "params:prepare.folder", images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits)


# ---------------------------------------------------------------- webdataset shards (img2dataset)
def load_webdataset(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    """Tar shards under prepare.folder named by the brace pattern prepare.shards; split by image hash
    (prepare.test_fraction), as a folder without a split column. Damaged shards are listed, not fatal."""
    if not cfg.folder or not cfg.shards:
        raise ConfigError("params.yaml: prepare.folder and prepare.shards: both must be set for source webdataset")
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise DatasetError(f"prepare.folder: {folder} is not a folder")
    samples, skipped = shards.list_samples(folder, cfg.shards)
    by_split: dict[str, list[dict]] = {}
    for s in samples:
        by_split.setdefault(split_by_content(s["sha256"], cfg.test_fraction), []).append(
            {"image_id": f"{s['shard']}/{s['key']}", "image_path": f"{s['shard']}/{s['member']}",
             "image_sha256": s["sha256"], "captions": [s["caption"]] if s["caption"] else [], "attributes": "{}"})
    splits = [Split(name, "params:prepare.folder", images) for name, images in sorted(by_split.items())]
    return splits, split_counts(splits) | {"skipped": {"count": len(skipped), "items": skipped}}


def load_source(cfg: PrepareConfig) -> tuple[list[Split], dict]:
    loaders = {"easyvqa": lambda _: load_easyvqa(), "folder": load_folder, "karpathy": load_karpathy,
               "webdataset": load_webdataset}
    return loaders[cfg.source](cfg)


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
