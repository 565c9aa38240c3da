"""The manifest: one Parquet table per split listing its images (and, for VQA sources, a questions table).

A row is an `ImageRow`: id, location relative to a declared image root, content hash, reference
captions, and attributes (JSON) when the source knows them. The root is stored symbolically
(``package:easy_vqa``, ``params:prepare.folder`` or ``params:prepare.test_folder``), never as a
machine path, so the same data gives byte-identical manifests on any machine. Every source
(pipeline.sources) builds its rows with `pipeline.sources.common.image_row`; every stage reads them with `read_manifest`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PrepareConfig
from pipeline.errors import DatasetError
from pipeline.io import atomic_path
from pipeline.paths import package_dir

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


# Attributes that put a test image in a group its metrics are also reported for, each under its own key:
# a source's own domain (NoCaps: in-domain, near-domain, out-of-domain) and the zero-shot split's
# seen / unseen (easy-VQA's colour-shape combinations, prepare.heldout).
DOMAIN = "domain"
ZERO_SHOT = "zero_shot"


def report_group(attributes: dict) -> str | None:
    """The group an item's metrics are reported under as well as overall: its zero-shot split where it has
    one, else its source's domain, else None. No source gives an image both."""
    return attributes.get(ZERO_SHOT) or attributes.get(DOMAIN)


@dataclass
class ImageRow:
    """One image of a split, as IMAGE_SCHEMA stores it (the fields in the schema's order)."""

    image_id: str
    image_path: str  # relative to the split's image root
    image_sha256: str
    captions: list[str] = field(default_factory=list)
    attributes: str = "{}"  # JSON object

    @property
    def labels(self) -> dict:
        """The attributes as a dict."""
        return json.loads(self.attributes or "{}")


@dataclass
class Split:
    name: str
    image_root: str  # symbolic root, resolved by resolve_image_root
    images: list[ImageRow]
    questions: list[dict] = field(default_factory=list)  # rows of QUESTION_SCHEMA


@dataclass(frozen=True)
class Manifest:
    split: str
    image_root: str
    images: list[ImageRow]

    @property
    def captions_by_id(self) -> dict[str, list[str]]:
        return {r.image_id: r.captions for r in self.images}


def resolve_image_root(symbol: str, cfg: PrepareConfig) -> Path:
    kind, _, value = symbol.partition(":")
    if kind == "package":
        return package_dir(value)
    if kind == "params" and value == "prepare.folder":
        return Path(cfg.folder)
    if kind == "params" and value == "prepare.test_folder":
        return Path(cfg.test_folder)
    raise DatasetError(f"manifest image_root {symbol!r} is not a known root")


def manifest_path(prepared_dir: Path, split: str) -> Path:
    return Path(prepared_dir) / f"{split}.parquet"


def questions_path(prepared_dir: Path, split: str) -> Path:
    return Path(prepared_dir) / f"{split}_questions.parquet"


def manifest_splits(prepared_dir: Path) -> list[str]:
    """Names of the splits that have a manifest, sorted."""
    return sorted(p.stem for p in Path(prepared_dir).glob("*.parquet") if not p.stem.endswith("_questions"))


def write_table(path: Path, rows: list[dict], schema: pa.Schema, metadata: dict[str, str]) -> None:
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_split(prepared_dir: Path, split: Split) -> None:
    meta = {"image_root": split.image_root, "split": split.name}
    write_table(manifest_path(prepared_dir, split.name), [asdict(r) for r in split.images], IMAGE_SCHEMA, meta)
    if split.questions:
        write_table(questions_path(prepared_dir, split.name), split.questions, QUESTION_SCHEMA, meta)


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
    rows = table.select(IMAGE_SCHEMA.names).to_pylist()
    return Manifest(split, meta.get("image_root", ""), [ImageRow(**r) for r in rows])


def has_captions(prepared_dir: Path, split: str) -> bool:
    """Whether any image of the split has a reference caption (VQAv2's images have none)."""
    return any(r.captions for r in read_manifest(prepared_dir, split).images)


def has_questions(prepared_dir: Path, split: str) -> bool:
    """Whether the split has a non-empty questions table (a captions-only source has none)."""
    path = questions_path(prepared_dir, split)
    return path.exists() and pq.read_metadata(path).num_rows > 0


def read_questions(prepared_dir: Path, split: str) -> list[dict]:
    path = questions_path(prepared_dir, split)
    if not path.exists():
        raise DatasetError(f"{path}: questions table not found (the prepared source has no VQA questions)")
    return pq.read_table(path).to_pylist()
