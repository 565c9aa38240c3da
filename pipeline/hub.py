"""A trained bridge on the Hugging Face Hub: fetched into (or read offline from) the local Hugging Face cache,
written with a model card, and uploaded.

A bridge on the Hub is a model repository holding the bridge folder's files (model.safetensors,
config.json) and a README.md model card. Nothing here runs unless asked: the pipeline itself never reaches
the Hub (HF_HUB_OFFLINE=1 reads only what the cache holds).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.bridge import CONFIG, WEIGHTS
from pipeline.errors import MissingInputError
from pipeline.io import write_text_atomic

CARD = "README.md"


def hub_folder(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a Hub bridge repository's files (downloaded when online and not cached); a repo
    that cannot be had is one line naming it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[WEIGHTS, CONFIG, CARD]))
    except LocalEntryNotFoundError:
        raise MissingInputError(f"{repo_id}: not a bridge folder here, and not in the local Hugging Face cache "
                                "(offline: HF_HUB_OFFLINE=1 reads only the cache; download it once online)") from None
    except (HfHubHTTPError, ValueError) as err:
        raise MissingInputError(f"{repo_id}: no bridge on the Hugging Face Hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None


def model_card(config: dict) -> str:
    """README.md for the Hub: metadata (front matter) and what the bridge is, how it was trained and used."""
    train, final = config.get("train", {}), config.get("final", {})
    base = config.get("llm", "")
    front = ["---", "library_name: vlap-pipeline", "pipeline_tag: image-to-text",
             "tags: [vlap, linear-bridge, frozen-llm, image-captioning]"]
    if base.startswith("hf:") and not Path(base[3:]).exists():  # a hub id, not a local folder
        front.append(f"base_model: {base[3:]}")
    front.append("---")
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()) if isinstance(v, float) and k != "lr")
    body = [
        f"# VLAP bridge ({config.get('method')}): {config.get('encoder')} → {config.get('llm')}", "",
        "A single linear layer that maps a frozen vision encoder's tokens into a frozen language model's "
        "input-embedding space (VLAP, ICLR 2024: assignment prediction with optimal transport, plus captioning). "
        f"Trained with method `{config.get('method')}` by vlap-pipeline.", "",
        "| | |", "| --- | --- |",
        f"| vision encoder | `{config.get('encoder')}` ({config.get('feature_shape', ['?', '?'])[0]} tokens of "
        f"{config.get('d_vision')}) |",
        f"| language model | `{config.get('llm')}` (d_model {config.get('d_model')}) |",
        f"| prompt | `{config.get('prompt')}` |",
        f"| training | {config.get('steps')} steps of batch {train.get('batch_size')}, {config.get('samples')} "
        f"(image, caption) pairs, lr {train.get('lr')}, {train.get('schedule', 'cosine')} schedule, "
        f"precision {config.get('precision')}, seed {train.get('seed')} |",
        f"| method settings | `{json.dumps(config.get('method_config', {}), sort_keys=True)}` |",
        f"| last step's losses | {losses or '–'} |", "",
        "## Use", "", "```python",
        "from pipeline.api import Bridge", "",
        "bridge = Bridge.from_pretrained(\"<this repo id>\")   # or a local folder",
        "bridge.caption([PIL.Image.open(\"image.png\")])", "```", "",
        "The encoder and the language model are loaded from the specs above on first use; an `hf` encoder must "
        "be named (`encoder=\"hf:<hub id>\"`). `config.json` holds every training setting.", ""]
    return "\n".join(front + [""] + body)


def write_model_card(folder: str | Path, config: dict) -> Path:
    path = Path(folder) / CARD
    write_text_atomic(path, model_card(config))
    return path


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload VLAP bridge") -> str:
    """Upload a bridge folder (with its model card) to a Hub model repository, created if needed; its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             allow_patterns=[WEIGHTS, CONFIG, CARD])
    return str(getattr(info, "commit_url", info))
