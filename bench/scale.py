"""Benchmark: training from the streaming feature store vs the in-memory loader as the split grows,
and extraction inline vs on 2 Dask workers, same run.

    python bench/scale.py [--sizes 5000 50000 200000] [--steps 8] [--batch-size 16] [--workdir DIR]
    python bench/scale.py --extract [--images 1000]

Training: synthetic caches of N samples written straight into the cache format (random float16
tokens, 49 x 1280, Fletcher-32 chunks; captions cycled from easy-VQA's), prototypes of the real
SmolLM2. Each (size, loader) runs in its own process: pipeline.train.train_step (method vlap, on the
run pipeline.train.build_training builds, at train.precision and in train_bridge's attention and
compile contexts) for --steps steps after one warm-up, batches a pure function of (seed, step). Loaders:
- streaming: pipeline.train.StepBatches through a DataLoader with 1 worker (the default), which
  reads only each batch's chunks;
- memory (the reference, the loader before the streaming store): every token of the split read
  into one tensor first, batches indexed from it. Skipped where it would not fit in RAM.
Reported: peak RSS of the training process and of its loader worker (getrusage), samples/s.

Extraction: the first --images easy-VQA train images through pipeline.extraction.extract_split, inline
and with a distributed.LocalCluster of 2 worker processes (each with the inline run's torch thread
count, which keeps the file byte-identical), and once more with 1 torch thread per worker (no
oversubscription of the cores, but other CPU kernels); same shard size; files compared byte for byte.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import children_peak_rss_mib, peak_rss_mib, report, run_child, time_call  # noqa: E402
from pipeline.manifest import Manifest, resolve_image_root  # noqa: E402
from pipeline.sources import easyvqa  # noqa: E402
from pipeline.extraction import FORMAT_VERSION  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.device import resolve_precision, training_attention  # noqa: E402

N_TOKENS, D_VISION, BLOCK = 49, 1280, 1000


def write_synthetic_cache(path: Path, n: int, seed: int = 0) -> None:
    """n random float16 samples in the extract stage's layout (one chunk per sample, Fletcher-32)."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w", track_order=True) as f:
        tokens = f.create_dataset("tokens", shape=(n, N_TOKENS, D_VISION), dtype="float16",
                                  chunks=(1, N_TOKENS, D_VISION), fletcher32=True, track_times=False)
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            tokens[start:stop] = rng.standard_normal((stop - start, N_TOKENS, D_VISION), dtype=np.float32)
        string = h5py.string_dtype()
        f.create_dataset("image_ids", data=np.array([f"s{i}" for i in range(n)], dtype=object), dtype=string)
        f.create_dataset("failed_ids", data=np.array([], dtype=object), dtype=string)
        f.create_dataset("failed_reasons", data=np.array([], dtype=object), dtype=string)
        f.attrs.update(cache_key=f"synthetic-{n}", split="train", encoder="synthetic", encoder_weights_sha256="0",
                       dtype="float16", format_version=FORMAT_VERSION)
    tmp.rename(path)


def child(args) -> None:
    """One training measurement; reports a JSON line."""
    from pipeline.distributed import Ranks
    from pipeline.lms import load_lm
    from pipeline.prototypes import build_prototypes, load_prototypes
    from pipeline.train import StepBatches, TrainData, batch_indices, build_training, train_step

    cfg = load_config()
    lm = load_lm(cfg.prototypes.llm, torch.device("cpu"))
    captions = sorted({c for s in easyvqa.load()[0] if s.name == "train" for r in s.images for c in r.captions})
    path, _ = build_prototypes(lm, captions, captions, cfg.prototypes, Path(args.workdir) / "prototypes", cfg.train.prompt)
    protos = load_prototypes(path)
    n = args.size
    train = TrainData(features_path=Path(args.workdir) / f"{n}.h5", rows=np.arange(n),
                      captions=[captions[i % len(captions)] for i in range(n)], image_ids=[f"s{i}" for i in range(n)],
                      d_vision=D_VISION, n_tokens=N_TOKENS, feature_dtype="float16", features_key="synthetic",
                      encoder="synthetic", encoder_weights_sha256="0")
    total = args.steps + 1
    if args.loader == "memory":
        with h5py.File(train.features_path, "r") as f:
            everything = torch.from_numpy(f["tokens"][:])  # the whole split in memory
        batches = ((s, idx, everything[idx]) for s in range(total)
                   for idx in [batch_indices(n, args.batch_size, cfg.train.seed, s)])
    else:
        batches = torch.utils.data.DataLoader(StepBatches(train, args.batch_size, cfg.train.seed, 0, total, Ranks()),
                                              batch_size=None, num_workers=1, prefetch_factor=2)
    precision = resolve_precision(cfg.train.precision, lm.device)
    # the lr schedule scales the step size only, not the work: it spans the steps run here, without warm-up
    run = build_training("vlap", cfg, lm, protos, D_VISION, total, 0, Ranks(), precision)
    todo = iter(batches)

    def step() -> None:  # the next batch from the loader, then one step: the loader's wait is part of the time
        _, idx, tokens = next(todo)
        train_step(run, tokens, [train.captions[i] for i in idx.tolist()])

    with lm.attention(training_attention(precision, lm.device)), lm.compiled(cfg.train.compile):  # as train_bridge
        steps = time_call(step, repeats=args.steps, warmup=1)
    # the loader's end: its worker exits and is waited for, so RUSAGE_CHILDREN below counts it
    assert next(todo, None) is None, "batches left over"
    report({"size": n, "loader": args.loader, "samples_per_s": args.steps * args.batch_size / steps.total,
            "peak_rss_mb": peak_rss_mib(), "worker_peak_rss_mb": children_peak_rss_mib()})


def training(args) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    rows = []
    for n in args.sizes:
        written = time_call(lambda: write_synthetic_cache(workdir / f"{n}.h5", n), repeats=1, warmup=0)
        print(f"cache of {n} samples ready ({written.median:.0f} s)", file=sys.stderr)
        for loader in ("streaming", "memory"):
            if loader == "memory" and n * N_TOKENS * D_VISION * 2 > 0.6 * available:
                rows.append({"size": n, "loader": loader, "skipped": f"needs {n * N_TOKENS * D_VISION * 2 / 2**30:.1f} "
                                                                     f"GiB of {available / 2**30:.1f} GiB free"})
                continue
            rows.append(run_child(__file__, "--child", "--size", n, "--loader", loader, "--steps", args.steps,
                                  "--batch-size", args.batch_size, "--workdir", workdir))
            print(rows[-1], file=sys.stderr)
    base = {r["loader"]: r for r in rows if r["size"] == args.sizes[0] and "skipped" not in r}
    print(f"\nVLAP step, batch {args.batch_size}, {args.steps} timed steps after 1 warm-up, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| samples | loader | peak RSS MB (trainer) | peak RSS MB (loader worker) | RSS / smallest | samples/s | "
          "samples/s / smallest |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['size']:,} | {r['loader']} | – | – | – | – | skipped: {r['skipped']} |")
            continue
        b = base[r["loader"]]
        print(f"| {r['size']:,} | {r['loader']} | {r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / b['peak_rss_mb']:.2f} | {r['samples_per_s']:.2f} | "
              f"{r['samples_per_s'] / b['samples_per_s']:.2f} |")


def extraction(args) -> None:
    import filecmp
    import tempfile

    from pipeline.extraction import ShardCluster, extract_split
    from pipeline.config import PrepareConfig
    from pipeline.encoders import load_encoder

    splits, _ = easyvqa.load()
    train = next(s for s in splits if s.name == "train")
    manifest = Manifest("train", train.image_root, train.images[: args.images])
    root = resolve_image_root(manifest.image_root, PrepareConfig())
    encoder = load_encoder("efficientnet-lite0", torch.device("cpu"))

    def on_cluster(out: Path, threads: int | None = None) -> tuple[float, object]:
        """(seconds to start the cluster, the extraction result) on 2 Dask workers."""
        with contextlib.ExitStack() as stack:
            started = time_call(lambda: stack.enter_context(ShardCluster(workers=2)), repeats=1, warmup=0)
            cluster = started.result
            if threads:
                cluster.threads = threads  # one thread per core: no oversubscription, but not the inline run's kernels
            return started.median, extract_split(manifest, root, encoder, out, batch_size=64, block_size=128,
                                                 cluster=cluster)

    with tempfile.TemporaryDirectory() as tmp:
        # each path once, into a fresh folder of its own
        inline_run = time_call(lambda: extract_split(manifest, root, encoder, Path(tmp) / "inline", batch_size=64,
                                                     block_size=128), repeats=1, warmup=0)
        inline, inline_s = inline_run.result, inline_run.median
        dask_run = time_call(lambda: on_cluster(Path(tmp) / "dask"), repeats=1, warmup=0)  # incl. start and close
        (startup, sharded), dask_s = dask_run.result, dask_run.median
        same = filecmp.cmp(inline.path, sharded.path, shallow=False)
        single_run = time_call(lambda: on_cluster(Path(tmp) / "dask1", threads=1), repeats=1, warmup=0)
        (_, single), single_s = single_run.result, single_run.median
        same_single = filecmp.cmp(inline.path, single.path, shallow=False)
    print(f"\n{args.images} easy-VQA images, EfficientNet-Lite0, shards of 128, batch 64, {os.cpu_count()} cores\n")
    print("| path | seconds | images/s | ratio to inline |")
    print("|---|---:|---:|---:|")
    print(f"| inline (1 process, torch threads {torch.get_num_threads()}) | {inline_s:.1f} | "
          f"{args.images / inline_s:.1f} | 1.00 |")
    print(f"| 2 Dask workers ({torch.get_num_threads()} torch threads each, incl. {startup:.1f} s cluster start) | "
          f"{dask_s:.1f} | "
          f"{args.images / dask_s:.1f} | {inline_s / dask_s:.2f} |")
    print(f"| 2 Dask workers (1 torch thread each) | {single_s:.1f} | {args.images / single_s:.1f} | "
          f"{inline_s / single_s:.2f} |")
    print(f"\nsame file byte for byte as inline: {same} (threads as inline), {same_single} (1 thread each)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 200000])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workdir", default="data/reports/bench-scale")
    p.add_argument("--extract", action="store_true", help="measure extraction inline vs 2 Dask workers instead")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--loader", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
    elif args.extract:
        extraction(args)
    else:
        training(args)


if __name__ == "__main__":
    main()
