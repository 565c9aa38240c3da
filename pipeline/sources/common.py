"""What the source readers share: which params keys name a source's files, the checks every file
source makes, the one constructor of a manifest row, and the deterministic split of sources that have
none of their own."""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.images import path_problem
from pipeline.io import sha256_file
from pipeline.manifest import ImageRow, Split


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


def require_keys(cfg: PrepareConfig, role: Role, source: str, *names: str) -> None:
    """The params a file source cannot do without, named as the user sets them."""
    if not all(getattr(cfg, n) for n in names):
        keys = " and ".join(role.key(n) for n in names)
        raise ConfigError(f"params.yaml: {keys}: all must be set for {role.key('source')} {source}")


def existing_folder(cfg: PrepareConfig, role: Role) -> Path:
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise DatasetError(f"{role.key('folder')}: {folder} is not a folder")
    return folder


def refuse_outside(root: Path, rel: str, where: str) -> None:
    """One line naming the entry when `rel` leads out of `root` (absolute, `..`, a symlink out), before
    anything at the path is read."""
    problem = path_problem(root, rel)
    if problem:
        raise DatasetError(f"{where}: image {rel!r} is {problem}: it must be a path inside {root} "
                           "(refused, nothing was read)")


def image_row(root: Path, rel: str, image_id: str, captions: list[str] | None = None,
              attributes: dict | None = None, where: str = "image") -> ImageRow:
    """The row of the image at root/rel, its content hashed here; a path out of `root` is refused first
    (the readers call refuse_outside before their own checks; this is the last guard)."""
    refuse_outside(root, rel, where)
    return ImageRow(image_id, rel, sha256_file(root / rel), list(captions or []),
                    json.dumps(attributes or {}, sort_keys=True))


SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a split names its manifest file: no path in it
MAX_CAPTION_CHARS = 1000  # far past any dataset's captions (COCO's longest is ~250): beyond is not a caption


@dataclass
class CaptionScreen:
    """Captions as a source gives them, each checked once: whitespace runs (tabs, newlines) become one
    space; a caption that is not text, empty, longer than MAX_CAPTION_CHARS or holds a control character
    is skipped, counted by reason and listed (the first 20) in the prepare report."""

    skipped: Counter = field(default_factory=Counter)
    first: list[dict] = field(default_factory=list)

    def __call__(self, text: object, where: str) -> str | None:
        """The caption to keep, or None (skipped, with its reason recorded)."""
        reason = None
        if isinstance(text, bytes):
            reason = "not UTF-8 text"
        elif not isinstance(text, str):
            reason = "not text"
        else:
            text = " ".join(text.split())
            control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
            if not text:
                reason = "empty"
            elif len(text) > MAX_CAPTION_CHARS:
                reason = f"longer than {MAX_CAPTION_CHARS} characters"
            elif control is not None:
                reason = f"control character U+{ord(control):04X}"
        if reason is None:
            return text
        self.skipped[reason.split(" U+")[0]] += 1
        if len(self.first) < 20:
            self.first.append({"where": where, "reason": reason})
        return None

    def report(self) -> dict:
        """{"captions_skipped": ...} when any caption was skipped, else nothing (reports stay as they were)."""
        if not self.skipped:
            return {}
        return {"captions_skipped": {"count": sum(self.skipped.values()), "reasons": dict(sorted(self.skipped.items())),
                                     "first": self.first}}


def split_name(value: object, where: str) -> str:
    """A split name as given by a source; one that could not name a manifest file is one line."""
    if not isinstance(value, str) or not SPLIT_NAME.fullmatch(value):
        raise DatasetError(f"{where}: split {value!r} is not a split name (letters, digits, _ or -)")
    return value


def split_by_content(image_sha256: str, test_fraction: float) -> str:
    """Deterministic split by content: the same image lands in the same split everywhere."""
    return "test" if int(image_sha256[:8], 16) / 16**8 < test_fraction else "train"


def split_counts(splits: list[Split]) -> dict[str, dict[str, int]]:
    return {s.name: {"images": len(s.images), "captions": sum(len(r.captions) for r in s.images)} for s in splits}


def read_json(path: Path, key: str) -> object:
    """A JSON file named by params `key`; a missing or unparsable file is one line naming it."""
    try:
        return load_json(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found ({key})") from None


def load_json(path: Path) -> object:
    """A user's JSON file, parsed; anything that is not UTF-8 JSON Python can hold is one line naming the file
    (FileNotFoundError is left to the caller, which knows which params key named the file)."""
    data = path.read_bytes()
    try:
        return parse_json(data.decode("utf-8"), path)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_json(text: str | bytes, path: Path | str) -> object:
    """json.loads, with each way a hostile file breaks it made one line naming `path`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:  # e.g. "[" * 100_000: deeper than the parser's recursion limit
        raise DatasetError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer over Python's 4,300-digit conversion limit
        raise DatasetError(f"{path}: JSON holds a value Python cannot read ({str(err).splitlines()[0]})") from None


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
