"""`device: auto` resolution (CUDA when present, else CPU), `precision: auto` (bf16 on a CUDA device that
has it, fp32 on every CPU) and the attention kernel a training step runs at that precision."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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


def resolve_precision(spec: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a CUDA device with bf16, fp32 on the CPU.

    Never bf16 on a CPU by default: an AVX2-only CPU emulates it (some 50x slower than fp32), and an
    AVX-512 CPU computes it natively but rounds differently, so the same params would train a
    different bridge on each kind of machine (the default run's CIDEr moved from 1.30 to 0.75)."""
    if spec == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return spec


def training_attention(precision: str, device: torch.device) -> str | None:
    """The LLM attention a training step runs: "eager" (explicit products, a float32 softmax) for bf16 on a
    CPU, where torch's fused bf16 attention backward took a third of the step (the step 2.80 -> 1.88 s, and
    the bridge's gradient as close to fp32's: bench/RESULTS.md); None (the model's own, SDPA) elsewhere."""
    return "eager" if precision == "bf16" and device.type == "cpu" else None


def training_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast a training step's forward runs under: bf16 for `bf16`, none for `fp32`."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
