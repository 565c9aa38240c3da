"""`device: auto` resolution (CUDA when present, else CPU) and `precision: auto` (bf16 where it is native)."""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} requested but CUDA is not available on this machine")
    return device


def native_bf16(device: torch.device) -> bool:
    """bf16 matrix products run in hardware: a CUDA device with bf16, or a CPU with AVX-512 (oneDNN's own
    check). Elsewhere (an AVX2-only CPU) autocast emulates them, some 40x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(spec: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the device computes it natively, else fp32."""
    if spec == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return spec
