"""Process-level settings that make CPU inference fast."""
from __future__ import annotations

import ctypes
import ctypes.util

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
