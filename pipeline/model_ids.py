"""How outputs name a model: a packaged model or a Hub id is its spec; a local transformers folder is never
named by its path, which would make the same run's outputs differ from machine to machine. Feature files,
and so bridge configs, record these names (pipeline.extraction); pipeline.hub and pipeline.api read them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

LOCAL_FOLDER = "hf-folder:"  # a transformers folder outside any Hugging Face cache: named, not located
LEGACY_HF = "hf"  # what feature files recorded for every transformers encoder before the id was recorded
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def model_id(spec: str) -> str:
    """The reproducible name of the model of `spec`, as feature files and so bridge configs record it.

    `efficientnet-lite0`, `hf:openai/clip-vit-base-patch32`: the spec itself. `hf:<local folder>`: a snapshot
    folder of a Hugging Face cache (…/models--owner--name/snapshots/<revision>) is its repo id,
    `hf:owner/name`; any other folder is `hf-folder:<the folder's name>`. The weights' sha256, recorded beside
    it, identifies the weights in every case (a folder's config `_name_or_path` is not used: transformers no
    longer saves it, and older versions saved the path a model was loaded from, or its base model's id).
    """
    if not spec.startswith("hf:") or not Path(spec[3:]).is_dir():  # as pipeline.weights resolves a spec
        return spec
    folder = Path(spec[3:]).resolve()
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return "hf:" + repo.removeprefix("models--").replace("--", "/")  # the cache's own naming of repo ids
    return LOCAL_FOLDER + Path(os.path.normpath(os.path.abspath(spec[3:]))).name


def locatable(recorded: str) -> bool:
    """Whether a recorded model id is a spec that loads (a packaged model or a Hub id), not only a name."""
    return recorded != LEGACY_HF and not recorded.startswith(LOCAL_FOLDER)


def hub_id(recorded: str) -> str | None:
    """The Hub repo id of a recorded `hf:` id, else None."""
    name = recorded.removeprefix("hf:")
    return name if recorded.startswith("hf:") and HUB_ID.fullmatch(name) else None
