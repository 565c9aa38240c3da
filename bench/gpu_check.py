"""GPU check: the embedded default's extraction and 20 VLAP training steps on CUDA and on CPU, same run.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py [--images 1024] [--steps 20]

Reference: the same stage functions with `device: cpu`. Prints seconds per device, the CUDA
speed-up, peak GPU memory, and how far the CUDA features and losses are from the CPU ones.
Works in a temporary data folder; nothing under data/ is touched. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.manifest import Split, read_manifest, write_split  # noqa: E402
from pipeline.features import FeatureCache, features_file  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402
from stages import extract, prepare, prototypes, train  # noqa: E402


def on_device(cfg, device: str, steps: int):
    return dataclasses.replace(
        cfg, extract=dataclasses.replace(cfg.extract, device=device),
        prototypes=dataclasses.replace(cfg.prototypes, device=device),
        train=dataclasses.replace(cfg.train, device=device, steps=steps, epochs=0.0, checkpoint_every=steps))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="train images extracted (test: a quarter)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", default="cuda,cpu", help="measured device, reference device (cpu,cpu: a dry run)")
    args = p.parse_args()
    measured, reference = args.devices.split(",")
    cuda = torch.cuda.is_available()
    if measured.startswith("cuda") and not cuda:
        print("gpu_check: no CUDA device on this machine; nothing to compare", file=sys.stderr)
        return 2
    base = load_config()
    root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    shared = Dirs.under(root / "shared")
    prepare.run(base, shared)
    for split, n in (("train", args.images), ("test", args.images // 4)):
        m = read_manifest(shared.prepared, split)
        write_split(shared.prepared, Split(split, m.image_root, m.images[:n]))
    results = {}
    for device in (measured, reference):
        cfg = on_device(base, device, args.steps)
        dirs = shared.sharing_inputs(root / f"{len(results)}-{device}", names=("prepared",))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # each stage once (a stage run is a one-off: a second would find its outputs); the harness waits for
        # queued CUDA kernels before each clock read
        t_extract = time_call(lambda: extract.run(cfg, dirs), repeats=1, warmup=0).median
        t_protos = time_call(lambda: prototypes.run(cfg, dirs), repeats=1, warmup=0).median
        trained = time_call(lambda: train.run(cfg, dirs, "vlap"), repeats=1, warmup=0)
        t_train, out = trained.median, trained.result
        results[len(results)] = {"extract_s": t_extract, "prototypes_s": t_protos, "train_s": t_train,
                           "final_loss": out["final"]["loss"], "throughput": out.get("throughput", {}),
                           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0}
        with FeatureCache(features_file(dirs.features, "train")) as cache:
            results[len(results) - 1]["features"] = cache.tokens(cache.ids[:64]).astype(np.float32)
    gpu, cpu = results[0], results[1]
    print(f"{measured}: {torch.cuda.get_device_name() if cuda else 'no GPU'}  |  {args.images} train + {args.images // 4} test images, "
          f"{args.steps} steps of batch {base.train.batch_size} ({base.train.precision})")
    print(f"{'stage':<12}{reference + ' s':>10}{measured + ' s':>10}{'speed-up':>10}")
    for stage in ("extract", "prototypes", "train"):
        c, g = cpu[f"{stage}_s"], gpu[f"{stage}_s"]
        print(f"{stage:<12}{c:>10.2f}{g:>10.2f}{c / g:>9.1f}x")
    print(f"peak GPU memory: {gpu['peak_gpu_mb']:.0f} MB")
    print(f"features max |{measured} - {reference}|: {np.abs(gpu['features'] - cpu['features']).max():.2e}")
    print(f"final loss {reference} {cpu['final_loss']:.4f}, {measured} {gpu['final_loss']:.4f}")
    for name, r in ((reference, cpu), (measured, gpu)):
        t = r["throughput"]
        if t:
            print(f"train throughput {name}: {t['mean_step_seconds']:.3f} s/step, {t['mean_samples_per_second']:.1f} "
                  f"samples/s, MFU {100 * t['mean_mfu']:.1f}% of {t['peak_gflop_per_second']:.0f} GFLOP/s")
    print(json.dumps({args.devices.split(",")[d]: {k: v for k, v in r.items() if k != "features"}
                      for d, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
