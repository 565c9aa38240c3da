"""The only trained part: a linear map from vision tokens to LLM input embeddings."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CacheError, MissingInputError
from pipeline.io import atomic_path

BRIDGES = ("linear",)


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


def save_bridge(path: str | Path, bridge: nn.Module, meta: dict) -> None:
    """bridge.pt (weights + the config needed to rebuild it) and a readable bridge.json beside it."""
    path = Path(path)
    buffer = io.BytesIO()  # saved to a file, torch names the archive after it: a temp name would vary
    torch.save({"state_dict": bridge.state_dict(), "meta": meta}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_bridge(path: str | Path, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, dict]:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: trained bridge not found (run the train stage first)")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        meta = saved["meta"]
        bridge = build_bridge(meta["bridge"], meta["d_vision"], meta["d_model"])
        bridge.load_state_dict(saved["state_dict"])
    except (RuntimeError, KeyError, EOFError, ValueError) as err:
        raise CacheError(f"{path}: not a readable bridge checkpoint ({type(err).__name__}: {err})") from None
    return bridge.to(device).eval(), meta
