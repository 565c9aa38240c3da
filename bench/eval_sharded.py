"""Benchmark: the captioning evaluation on 1 process and sharded on N (evaluate.common.nproc_per_node), same run.

    python bench/eval_sharded.py [--processes 2] [--images 16 64] [--method vlap]

Runs `python -m stages.evaluate_caption` on the default run's cached inputs and trained bridge (data/prepared,
data/features, data/prototypes, data/models/<method>: `dvc repro train`) in temporary data roots, with
evaluate.common.nproc_per_node 1 and N, each at two image counts. The per-image time is the difference of the
two wall times over the image difference, so start-up (interpreters, LLM loads, the METEOR JVM, the process
group) cancels out. The one-process run has the machine's cores, each of the N processes cores / N (as the
stage gives them). Prints both per-image times, their ratio, whether the outputs are byte-identical, and an
ESTIMATE of VQAv2 val (214,354 questions) on 8 GPUs from the measured time scaled by FLOPs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import yaml  # noqa: E402

from harness import time_call  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402

VQAV2_VAL_QUESTIONS = 214_354
VQAV2_CLOSED_ANSWERS = 3129  # the closed-vocabulary candidates of a VQAv2 evaluation (README)


def run(params: Path, root: Path, method: str) -> float:
    Dirs().sharing_inputs(root, names=("prepared", "features", "prototypes", "models"))
    cmd = [sys.executable, "-m", "stages.evaluate_caption", "--method", method, "--params", str(params),
           "--data", str(root)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # every core; the stage splits them
    return time_call(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env),
                     repeats=1, warmup=0).median


def outputs(root: Path, method: str) -> list[bytes]:
    return [(root / p).read_bytes() for p in (f"metrics/caption/{method}.json",
                                               f"plots/caption/{method}/captions.json")]


def lm_size(method: str) -> tuple[int, int, int, int]:
    """(LM parameters, visual tokens, prompt tokens, distinct inner trie nodes of VQAv2-sized closed candidates)
    of the bridge's LLM, for the FLOP counts. The closed ranking (pipeline.generation.rank_candidates) runs the
    prefix once and then only the candidates' distinct inner trie nodes through the LM: one-token answers are
    read off the prefix's logits. The candidates are bench/vqa_closed.py's stand-ins for VQAv2's answer list."""
    import json

    import torch
    from vqa_closed import candidates, inner_trie_nodes

    from pipeline.lms import load_lm

    meta = json.loads((Dirs().models / method / "config.json").read_text())
    lm = load_lm(meta["llm"], torch.device("cpu"))
    token_ids = [lm.tokenizer(c, add_special_tokens=False)["input_ids"]
                 for c in candidates(lm.tokenizer, VQAV2_CLOSED_ANSWERS)]
    return (sum(p.numel() for p in lm.model.parameters()), int(meta["feature_shape"][0]),
            len(lm.prompt_ids(meta["prompt"])), inner_trie_nodes(token_ids))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--images", type=int, nargs=2, default=(16, 64))
    p.add_argument("--method", default="vlap")
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="ESTIMATE: sustained TFLOP/s of one GPU on this work (assumed, default 100: about 10%% of "
                        "an H100's bf16 dense peak, for batch-32 decoding of a small LM)")
    args = p.parse_args()
    if not (Dirs().models / args.method / "config.json").exists():
        print(f"bench/eval_sharded.py: needs the trained {args.method} bridge: `dvc repro train@{args.method}`",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="eval-sharded-bench-"))
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["evaluate"]["common"]["device"] = "cpu"
    walls = {}
    for n in args.images:
        for processes in (1, args.processes):
            raw["evaluate"]["common"] |= {"test_images": n, "nproc_per_node": processes}
            params = tmp / f"params-{n}-{processes}.yaml"
            params.write_text(yaml.safe_dump(raw))
            walls[n, processes] = run(params, tmp / f"{n}-{processes}", args.method)
            print(f"{n} images, {processes} process(es): {walls[n, processes]:.1f} s", flush=True)
    lo, hi = args.images
    per_image = {k: (walls[hi, k] - walls[lo, k]) / (hi - lo) for k in (1, args.processes)}
    if min(per_image.values()) <= 0:
        print(f"per-image times {per_image} are not positive: the machine was too busy; run again", file=sys.stderr)
        return 1
    ratio = per_image[1] / per_image[args.processes]
    same = outputs(tmp / f"{hi}-1", args.method) == outputs(tmp / f"{hi}-{args.processes}", args.method)
    print(f"measured, per image: 1 process {per_image[1]:.3f} s, {args.processes} processes "
          f"{per_image[args.processes]:.3f} s, ratio {ratio:.2f}x (>1: sharded is faster) on {os.cpu_count()} cores")
    print(f"metrics and captions.json of {hi} images byte-identical between 1 and {args.processes} processes: {same}")

    # ESTIMATE: FLOPs of the LM forward passes (2 x parameters per token), this CPU's measured rate on them,
    # and VQAv2's per-question tokens: its prefix, 4 open-ended tokens, the closed candidates' inner trie nodes.
    params, visual, prompt, trie_nodes = lm_size(args.method)
    new_tokens = int(raw["evaluate"]["caption"]["max_new_tokens"])
    caption_flops = 2 * params * (visual + prompt + new_tokens)
    cpu_rate = caption_flops / per_image[1]
    question_tokens = visual + 12 + 4 + trie_nodes  # ~12 tokens of question text
    question_flops = 2 * params * question_tokens
    total = VQAV2_VAL_QUESTIONS * question_flops
    one_cpu = total / cpu_rate
    gpus = total / (8 * args.gpu_tflops * 1e12)
    print(f"ESTIMATE (not measured): LM {params / 1e6:.0f}M parameters; a caption {caption_flops / 1e9:.1f} GFLOP "
          f"-> this CPU ran {cpu_rate / 1e9:.0f} GFLOP/s in one process; a VQAv2 question ~{question_tokens:.0f} "
          f"tokens ({trie_nodes} inner trie nodes of {VQAV2_CLOSED_ANSWERS} candidates) = {question_flops / 1e12:.2f} TFLOP, "
          f"{VQAV2_VAL_QUESTIONS:,} questions = {total / 1e15:.0f} PFLOP")
    print(f"ESTIMATE: VQAv2 val on this machine, one process: {one_cpu / 86400:.1f} days; "
          f"on 8 GPUs, {args.processes}-way measured ratio aside (sharding is per question, no communication but the "
          f"final gather), at an assumed {args.gpu_tflops:g} TFLOP/s each: {gpus / 60:.0f} min "
          f"({one_cpu / gpus:.0f}x this CPU process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
