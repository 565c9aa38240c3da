"""Benchmark: the extract path (pipeline.extraction.extract_split) against the encoder's forward alone, same run.

    python bench/extract.py [--images 1000] [--batch-size 64] [--decode-workers 4] [--chunks 4]
                            [--device auto] [--threads T]

The first N easy-VQA train images (64x64 PNG, resized to 224x224), the real EfficientNet-Lite0:
- forward only: the encoder's forward (encode_pixels: host-to-device copy, forward, tokens back to the
  host) on batches decoded and preprocessed beforehand -- the rate the pipeline can at best reach;
- extract_split with --decode-workers threads decoding and preprocessing ahead of the forward, and
  with 0 (every image decoded in the encoding thread): the whole stage path (decode, preprocess,
  forward, shard files, final float16 HDF5 assembly) into a temp dir.
The three alternate over --chunks chunks of the images (each chunk a fresh extract_split into a new temp
dir) so that all see the same machine load. Prints each path's images/s, the pipeline's rate as a
share of the forward-only rate, and the encoder's GFLOP/s (FlopCounterMode on one 224x224 image).
Asserts that the cached tokens of both pipeline runs are identical and agree with a direct
encoder.encode of the first few images (within float16 rounding).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.config import PrepareConfig  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.encoders import LITE_SIZE, load_encoder  # noqa: E402
from pipeline.extraction import extract_split  # noqa: E402
from pipeline.features import FeatureCache  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.manifest import Manifest, resolve_image_root  # noqa: E402
from pipeline.sources import easyvqa  # noqa: E402

CHECKED = 8  # images whose cached tokens are compared with a direct encode


def encoder_gflops_per_image(encoder) -> float:
    pixels = torch.zeros(1, 3, LITE_SIZE, LITE_SIZE, device=encoder.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.forward_tokens(pixels)
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-workers", type=int, default=4,
                   help="threads decoding ahead of the forward, against none (extract.decode_workers; default 4)")
    p.add_argument("--chunks", type=int, default=4, help="alternate the paths over this many chunks")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as extract.device)")
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
    encoder = load_encoder("efficientnet-lite0", resolve_device(args.device))
    gflop_img = encoder_gflops_per_image(encoder)

    def sync(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.cpu()  # the pipeline takes every batch's tokens back to the host too

    # Pre-decoded input of the forward-only path: a few distinct preprocessed batches, cycled (the forward's
    # cost does not depend on the pixels, and all N images' pixels would take ~0.6 MB each).
    held = [encoder.preprocess([load_image(path) for path in paths[i : i + args.batch_size]])
            for i in range(0, min(n, 4 * args.batch_size), args.batch_size)]
    sync(encoder.encode_pixels(held[0]))  # warm-up (allocator, oneDNN kernels / CUDA context)

    def forward_only(count: int) -> None:
        done, k = 0, 0
        while done < count:
            pixels = held[k % len(held)][: count - done]
            sync(encoder.encode_pixels(pixels))
            done, k = done + len(pixels), k + 1

    size = -(-n // args.chunks)
    paths_run = {"forward": f"forward only (encode_pixels on pre-decoded batches of {args.batch_size})",
                 "threads": f"extract_split, decode_workers {args.decode_workers}",
                 "serial": "extract_split, decode_workers 0"}
    seconds = dict.fromkeys(paths_run, 0.0)
    files = {"threads": [], "serial": []}
    with tempfile.TemporaryDirectory() as tmp:
        for c, lo in enumerate(range(0, n, size)):
            chunk = Manifest("train", train.image_root, manifest.images[lo : lo + size])
            seconds["forward"] += time_call(lambda: forward_only(len(chunk.images)), repeats=1, warmup=0).median
            for name, workers in (("threads", args.decode_workers), ("serial", 0)):
                out = Path(tmp) / f"{name}-{c}"
                timed = time_call(lambda: extract_split(chunk, root, encoder, out, "float16", args.batch_size,
                                                        decode_workers=workers), repeats=1, warmup=0)
                seconds[name] += timed.median
                files[name].append(timed.result.path)
        for a, b in zip(files["threads"], files["serial"]):
            assert a.read_bytes() == b.read_bytes(), f"{a.name}: decode threads changed the feature file"
        with FeatureCache(files["threads"][0]) as cache:
            first = [r.image_id for r in manifest.images[:CHECKED]]
            cached = cache.tokens(first).astype(np.float32)
    direct = encoder.encode([load_image(path) for path in paths[: len(first)]]).cpu().numpy()
    diff = np.abs(cached - direct)
    # float16 keeps 11 significant bits: allow one rounding step (2^-11 relative) plus a little fp32 noise.
    assert (diff <= np.abs(direct) * 2**-10 + 1e-4).all(), f"cache and direct encode disagree: max {diff.max():.3g}"

    rates = {name: n / secs for name, secs in seconds.items()}
    print(f"torch {torch.__version__}, device {encoder.device}, threads {torch.get_num_threads()}, "
          f"EfficientNet-Lite0 224x224, {n} easy-VQA train images, batch {args.batch_size}, "
          f"encoder {gflop_img:.3f} GFLOP/image (FlopCounterMode), {args.chunks} alternating chunks, "
          f"1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after\n")
    print("| path | images | seconds | images/s | % of forward-only | encoder GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in paths_run.items():
        print(f"| {label} | {n} | {seconds[name]:.2f} | {rates[name]:.1f} | "
              f"{100 * rates[name] / rates['forward']:.1f}% | {rates[name] * gflop_img:.1f} |")
    print(f"\npipeline / forward-only: {rates['threads'] / rates['forward']:.2f} with {args.decode_workers} decode "
          f"workers, {rates['serial'] / rates['forward']:.2f} without; the two feature files are byte-identical; "
          f"tokens of the first {len(first)} images agree with a direct encode (max abs diff {diff.max():.2e})")


if __name__ == "__main__":
    main()
