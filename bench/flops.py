"""This machine's dense matmul rate: the reference "peak" for bench/extract.py and bench/train_step.py.

    python bench/flops.py [--size 2048] [--repeats 10]

Times an (n x n) @ (n x n) matmul in float32 and bfloat16 (torch, torch.get_num_threads() threads)
and prints the median GFLOP/s (2 n^3 FLOPs per product). Also imported by the other benches.
"""
from __future__ import annotations

import argparse

import torch

from harness import time_call


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of `repeats` timed (size x size) @ (size x size) products, after 2 warm-ups."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    return 2 * size**3 / time_call(lambda: torch.matmul(a, b, out=out), repeats=repeats, warmup=2).median / 1e9


def bf16_native() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (else it emulates it, ~50x slower than fp32)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.size}x{args.size} @ {args.size}x{args.size}, median of {args.repeats}\n")
    print(f"bf16 native on this CPU (oneDNN): {'yes' if bf16_native() else 'no'}\n")
    print("| dtype | GFLOP/s |")
    print("|---|---:|")
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates[dtype] = matmul_gflops(dtype, args.size, args.repeats)
        print(f"| {str(dtype).removeprefix('torch.')} | {rates[dtype]:.1f} |", flush=True)
    print(f"\nbfloat16 / float32 rate: {rates[torch.bfloat16] / rates[torch.float32]:.3f}")


if __name__ == "__main__":
    main()
