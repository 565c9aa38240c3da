"""What the source readers share: which params keys name a source's files, the checks every file
source makes, and the deterministic split of sources that have none of their own."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.manifest import Split


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


def split_by_content(image_sha256: str, test_fraction: float) -> str:
    """Deterministic split by content: the same image lands in the same split everywhere."""
    return "test" if int(image_sha256[:8], 16) / 16**8 < test_fraction else "train"


def split_counts(splits: list[Split]) -> dict[str, dict[str, int]]:
    return {s.name: {"images": len(s.images), "captions": sum(len(r.captions) for r in s.images)} for s in splits}


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
