"""The only trained part: a linear map from vision tokens to LLM input embeddings, and its files.

A trained bridge is a folder, as Hugging Face models are: ``model.safetensors`` (the weights, no
code, loadable anywhere) and ``config.json`` (the bridge's kind and shape, the encoder and LLM it
was trained between, the prompt, the method and its settings, the shape and storage dtype of the
features it reads). pipeline.api.Bridge wraps it with the models it needs to caption or answer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CacheError, MissingInputError
from pipeline.io import atomic_path

BRIDGES = ("linear",)
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class LinearBridge(nn.Module):
    """V = X Wᵀ + b, token by token: (B, N, d_v) -> (B, N, D)."""

    def __init__(self, d_vision: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_vision, d_model, bias=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def build_bridge(kind: str, d_vision: int, d_model: int) -> nn.Module:
    if kind != "linear":
        raise ValueError(f"bridge: unknown kind {kind!r} (expected one of {', '.join(BRIDGES)})")
    return LinearBridge(d_vision, d_model)


def visual_representation(V: torch.Tensor) -> torch.Tensor:
    """z_v = l2norm(mean over tokens of V): (B, N, D) -> (B, D)."""
    return F.normalize(V.mean(1), dim=-1)


def save_bridge(folder: str | Path, bridge: nn.Module, config: dict) -> None:
    """folder/model.safetensors and folder/config.json, each written atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()}
    data = save(state, metadata={"format": "pt"})  # bytes: the same state gives the same file
    with atomic_path(folder / WEIGHTS) as tmp:
        tmp.write_bytes(data)
    with atomic_path(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_bridge_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise MissingInputError(f"{path}: trained bridge not found (run the train stage first)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: not a readable bridge config ({err}); "
                         f"train it again (dvc repro -f train@{path.parent.name})") from None


def load_bridge(folder: str | Path, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, dict]:
    """The bridge of a folder written by save_bridge, in eval mode on `device`, and its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.exists():
        raise MissingInputError(f"{weights}: trained bridge not found (run the train stage first)")
    config = read_bridge_config(folder)
    try:
        bridge = build_bridge(config["bridge"], config["d_vision"], config["d_model"])
        bridge.load_state_dict(load_file(weights))
    except (SafetensorError, RuntimeError, KeyError, ValueError, OSError) as err:
        reason = " ".join(str(err).split())  # torch lists each mismatched tensor on its own line
        raise CacheError(f"{weights}: not a readable bridge ({type(err).__name__}: {reason}); "
                         f"train it again (dvc repro -f train@{folder.name})") from None
    return bridge.to(device).eval(), config
