"""Benchmark: the extract path (pipeline.extraction.extract_split) vs a one-image-at-a-time loop, same run.

    python bench/extract.py [--images 1000] [--batch-size 64] [--chunks 4] [--threads T]

The first N easy-VQA train images (64x64 PNG, resized to 224x224), the real EfficientNet-Lite0:
- extract_split: batched encoding into a float16 HDF5 cache in a temp dir (decode, preprocess,
  forward, block files, final assembly - the whole stage path);
- naive reference: for each image, load_image + encoder.encode([img]), no cache writing.
The two alternate over --chunks chunks of the images (each chunk a fresh extract_split into a new
temp dir) so that both see the same machine load.
Also two breakdown rows (decode + preprocess alone; forward alone on one preprocessed batch).
Encoder FLOPs per image come from torch's FlopCounterMode on one 224x224 forward_tokens; the
achieved GFLOP/s is compared with this machine's fp32 matmul rate (bench/flops.py). Asserts that
both paths give the same tokens for the first few images (within float16 rounding).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from flops import matmul_gflops  # noqa: E402
from harness import time_call  # noqa: E402
from pipeline.extraction import extract_split  # noqa: E402
from pipeline.features import FeatureCache  # noqa: E402
from pipeline.config import PrepareConfig  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.manifest import Manifest, resolve_image_root  # noqa: E402
from pipeline.sources import easyvqa  # noqa: E402
from pipeline.encoders import LITE_SIZE, load_encoder  # noqa: E402

CHECKED = 8  # images whose tokens are compared between the two paths


def encoder_gflops_per_image(encoder) -> float:
    pixels = torch.zeros(1, 3, LITE_SIZE, LITE_SIZE)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.forward_tokens(pixels)
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4, help="alternate the two paths over this many chunks")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    train = next(s for s in easyvqa.load()[0] if s.name == "train")
    manifest = Manifest("train", train.image_root, train.images[: args.images])
    root = resolve_image_root(train.image_root, PrepareConfig())
    paths = [root / r.image_path for r in manifest.images]
    n = len(paths)
    encoder = load_encoder("efficientnet-lite0", torch.device("cpu"))
    gflop_img = encoder_gflops_per_image(encoder)
    peak = matmul_gflops(torch.float32)
    encoder.encode([load_image(paths[0])] * args.batch_size)  # warm-up (allocator, oneDNN kernels)

    # The two paths alternate over chunks of the images so both see the same machine load; each chunk is
    # other images, so each timing is one call (no repeats) and the chunks' seconds add up.
    size = -(-n // args.chunks)
    naive, cached, seconds = [], None, {"naive": 0.0, "extract": 0.0}
    for lo in range(0, n, size):
        encoded = time_call(lambda: [encoder.encode([load_image(path)]) for path in paths[lo : lo + size]],
                            repeats=1, warmup=0)
        naive += encoded.result  # (1, N, d_v) each
        seconds["naive"] += encoded.median
        with tempfile.TemporaryDirectory() as tmp:
            chunk = Manifest("train", train.image_root, manifest.images[lo : lo + size])
            extracted = time_call(lambda: extract_split(chunk, root, encoder, Path(tmp), "float16", args.batch_size),
                                  repeats=1, warmup=0)
            result = extracted.result
            seconds["extract"] += extracted.median
            if cached is None:
                with FeatureCache(result.path) as cache:
                    first = [r.image_id for r in chunk.images[:CHECKED]]
                    cached = torch.from_numpy(cache.tokens(first)).float()
    rows = [("naive: load_image + encode([img]) per image", n, seconds["naive"]),
            (f"extract_split, batch {args.batch_size} (+ HDF5 cache)", n, seconds["extract"])]
    reference = torch.cat(naive[:len(cached)])  # the first chunk may hold fewer than CHECKED images
    diff = (cached - reference).abs()
    # float16 keeps 11 significant bits: allow one rounding step (2^-11 relative) plus a little fp32 noise.
    bound = reference.abs() * 2**-10 + 1e-4
    assert (diff <= bound).all(), f"paths disagree: max abs diff {diff.max():.3g}"


    def preprocess_all() -> None:  # each image's pixels dropped at once, not kept (~0.6 MB each)
        for path in paths:
            encoder.preprocess([load_image(path)])

    rows.append(("  breakdown: load_image + preprocess only", n, time_call(preprocess_all, repeats=1, warmup=0).median))
    pixels = encoder.preprocess([load_image(path) for path in paths[: args.batch_size]])
    with torch.inference_mode():
        forward = time_call(lambda: encoder.forward_tokens(pixels), repeats=3, warmup=0)
    rows.append((f"  breakdown: forward_tokens only, batch {len(pixels)} (median of 3)", len(pixels), forward.median))
    # bf16 autocast (this CPU's avx512_bf16): faster only if its error stays within the cache's float16 rounding

    def forward_bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder.forward_tokens(pixels).float()

    with torch.inference_mode():
        fp32 = encoder.forward_tokens(pixels)
        forward = time_call(forward_bf16, repeats=3, warmup=0)
    bf16 = forward.result
    rows.append((f"  breakdown: forward_tokens only, bf16 autocast, batch {len(pixels)} (median of 3)", len(pixels),
                 forward.median))
    bf16_error = ((bf16 - fp32).abs() / (fp32.abs() * 2**-11 + 1e-4)).max().item()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, EfficientNet-Lite0 224x224, "
          f"{n} easy-VQA train images, encoder {gflop_img:.3f} GFLOP/image (FlopCounterMode), "
          f"fp32 matmul peak {peak:.1f} GFLOP/s, {args.chunks} alternating chunks, "
          f"1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after\n")
    print("| path | images | seconds | images/s | encoder GFLOP/s | % of fp32 peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, count, secs in rows:
        rate = count / secs
        flops = "" if "preprocess only" in name else f"{rate * gflop_img:.1f}"
        share = "" if not flops else f"{100 * rate * gflop_img / peak:.1f}%"
        print(f"| {name} | {count} | {secs:.2f} | {rate:.1f} | {flops} | {share} |")
    print(f"\nimages/s extract_split / naive: {rows[0][2] / rows[1][2]:.2f}; tokens of the first {CHECKED} images agree "
          f"(max abs diff {diff.max():.2e}, float16 cache vs float32 naive)")
    print(f"bf16 autocast forward: its largest error is {bf16_error:.1f}x one float16 rounding step of the value "
          f"(the cache's own storage error is <= 1x): {'within' if bf16_error <= 1 else 'NOT within'} the cache's "
          "tolerance")


if __name__ == "__main__":
    main()
