"""Process-level settings: CPU kernels pinned to one instruction set (the same bytes on every x86-64
CPU), and freed memory kept (fast CPU inference)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from pathlib import Path

# torch picks its CPU kernels by instruction set: an AVX-512 machine runs other float32 matmul
# (MKL) and vectorised reduction (ATen) kernels than an AVX2 one, which round differently, so the
# same params trained different bridges on the two (the default run's vlap CIDEr 1.30 against 1.20).
# Pinned to AVX2, which every x86-64 machine of the last decade has, both give the same bytes.
# Set ATEN_CPU_CAPABILITY / MKL_CBWR yourself to choose other kernels.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels() -> bool:
    """Pin torch's CPU kernels to AVX2 where the CPU has it; must run before the process's first tensor
    operation (torch reads both settings then), so stages/ and vlap/ call it on import."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:  # not Linux: leave the kernels to torch
        return False
    if "avx2" not in flags.split():
        return False
    for name, value in PINNED_KERNELS.items():
        os.environ.setdefault(name, value)
    # torch.compile (train.compile) caches compiled kernels across processes without keying them by
    # ATEN_CPU_CAPABILITY: a kernel cached by an unpinned process fails in a pinned one ("tuple args
    # required"). Pinned processes get their own cache folder.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / (
        f"torchinductor_uid{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")))
    return True

# glibc returns large blocks (each layer's batch activations) to the OS after every use,
# so each forward pass pays page faults and zero-filling; keeping them measured 2-2.5x
# faster batched extraction here (bench/RESULTS.md). No-op where glibc is absent.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False
