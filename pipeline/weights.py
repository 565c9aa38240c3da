"""Model weights on this machine: finding a transformers folder offline, loading one at a time, and
their content hashes (every stage that loads a model records them: a bridge only fits the features
and the LLM it was trained with), each file hashed once and remembered (pipeline.digests)."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

from pipeline.digests import file_digests
from pipeline.errors import ConfigError
from pipeline.io import sha256_json

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".json", ".gguf", ".model"}


class WeightsNotFound(ConfigError):
    """Model weights are not on this machine; one line says which and where."""


_LOAD_LOCK = threading.Lock()


def serialised_load(fn):
    """transformers' from_pretrained is not safe in two threads at once (a Prefect thread pool)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LOAD_LOCK:
            return fn(*args, **kwargs)

    return wrapper


def resolve_hf_folder(spec: str, role: str) -> Path:
    """Local folder for ``hf:<id or folder>``; never downloads (offline by default)."""
    name = spec.removeprefix("hf:")
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise WeightsNotFound(
            f"{role} {spec}: weights not found on this machine (offline); put the model in a local folder and use hf:<folder>"
        ) from None


def weights_hash(folder: Path) -> str:
    """Hash of the weight and config files of a transformers model folder."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return sha256_json(dict(zip((p.name for p in files), file_digests(files))))
