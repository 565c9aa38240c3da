"""Benchmark: closed-vocabulary VQA ranking at VQAv2's 3,129 answers, chunked against the unchunked
ranking it replaced, same model, same inputs, same run.

    python bench/vqa_closed.py [--questions 32] [--candidates 3129] [--prefix 60]

Each measurement runs in a fresh process (so its peak resident memory is its own): SmolLM2-135M is
loaded, its resident memory read (the model's footprint), then `rank_candidates` scores C candidate
answers after Q random prefixes of P soft tokens, and the process reports its time and its peak
resident memory above the footprint (Linux VmHWM). The reference is the ranking before chunking
(tests/reference_ranking.py), run at the sizes where it fits; both score the same inputs, and the
bench asserts their scores agree within 1e-4.

The candidates stand in for VQAv2's answer list (not shipped here): distinct 1-, 2- and 3-word
phrases (60 / 30 / 10 %) of single-token words from SmolLM2's vocabulary. The printed VQAv2 estimate
(214k val questions, OPT-1.3B, one A100) is an estimate from FLOPs, not a measurement.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402

from harness import ChildFailed, report, run_child, time_call  # noqa: E402
sys.path.insert(0, str(common.ROOT / "tests"))  # the reference ranking lives with the tests that check it

HERE = Path(__file__).resolve()
A100_BF16_FLOPS = 312e12  # dense bf16 peak
ASSUMED_MFU = 0.4  # for the estimate only
OPT13_PARAMS = 1.3e9
VQAV2_VAL_QUESTIONS = 214_354


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def candidates(tokenizer, n: int, seed: int = 0) -> list[str]:
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()
                    and t[1:].islower() and 3 <= len(t) - 1 <= 9})
    rng, out = random.Random(seed), {}
    while len(out) < n:
        k = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
        phrase = " " + " ".join(rng.sample(words, k))
        out[phrase] = None
    return list(out)


def child(impl: str, n_candidates: int, n_questions: int, prefix: int, scores_path: str | None,
          device: str = "cpu") -> dict:
    from pipeline.generation import rank_candidates
    from pipeline.lms import load_lm
    from reference_ranking import unchunked_rank_candidates

    lm = load_lm("smollm2-135m", torch.device(device))
    torch.manual_seed(0)
    scale = lm.embed(torch.arange(1000, device=lm.device)).std()
    embeds = torch.randn(n_questions, prefix, lm.hidden_size).to(lm.device) * scale
    mask = torch.ones(n_questions, prefix, dtype=torch.long, device=lm.device)
    cands = candidates(lm.tokenizer, n_candidates)
    lengths = [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in cands]
    rank = rank_candidates if impl == "chunked" else unchunked_rank_candidates
    rank(lm, embeds[:1], mask[:1], cands[:4])  # warm-up (kernels, allocator) before the footprint is read
    cuda = lm.device.type == "cuda"
    if cuda:  # on a GPU the memory that matters is the device's: allocated above the model's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        footprint = torch.cuda.memory_allocated() / 1024
    else:
        footprint = rss_kb("VmRSS")
    # one timed call: a repeat would find the allocator's pages already resident, and the peak is this call's
    ranked = time_call(lambda: rank(lm, embeds, mask, cands), repeats=1, warmup=0)
    scores, seconds = ranked.result, ranked.median
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else rss_kb("VmHWM")
    if scores_path:
        torch.save(scores.cpu(), scores_path)
    return {"impl": impl, "candidates": n_candidates, "questions": n_questions, "seconds": seconds,
            "footprint_gb": footprint / 2**20, "peak_above_gb": (peak - footprint) / 2**20, "tokens": lengths}


def measure(impl: str, C: int, Q: int, prefix: int, scores_path: Path | None = None, device: str = "cpu") -> dict:
    args = ["--child", impl, "--candidates", C, "--questions", Q, "--prefix", prefix, "--device", device]
    try:
        return run_child(HERE, *args, *(["--scores", scores_path] if scores_path else []))
    except ChildFailed as failed:  # the kernel's OOM killer, or an allocation failure
        return {"impl": impl, "candidates": C, "questions": Q, "failed": f"exit {failed.returncode}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--candidates", type=int, default=3129)
    p.add_argument("--prefix", type=int, default=60, help="soft tokens before each answer")
    p.add_argument("--compare", nargs="*", default=["50x8", "100x8"],
                   help="candidates x questions also run unchunked (200x8 needs ~20 GB)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, peak = GPU memory above the model's)")
    p.add_argument("--child", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    p.add_argument("--scores", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        report(child(args.child, args.candidates, args.questions, args.prefix, args.scores, args.device))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, SmolLM2-135M on {args.device}, prefix "
          f"{args.prefix} random soft tokens; peak = {'GPU' if args.device != 'cpu' else 'resident'} memory above "
          "the loaded model's")
    print("| candidates × questions | ranking | seconds | s / question | peak above model (GB) | model (GB) |")
    print("|---:|---|---:|---:|---:|---:|")
    tmp = Path("/tmp") / "vqa_closed_scores"
    tmp.mkdir(exist_ok=True)
    rows = []
    compare = [tuple(int(v) for v in size.split("x")) for size in args.compare]
    for C, Q in compare:  # sizes where the unchunked ranking fits
        pair = {}
        for impl in ("unchunked", "chunked"):
            pair[impl] = measure(impl, C, Q, args.prefix, tmp / f"{impl}-{C}-{Q}.pt", args.device)
            rows.append(pair[impl])
        a, b = (torch.load(tmp / f"{impl}-{C}-{Q}.pt") for impl in ("unchunked", "chunked"))
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"{C}x{Q}: chunked scores differ from the unchunked ones by {diff}"
        pair["chunked"]["max_abs_diff"] = diff
    rows.append(measure("chunked", args.candidates, args.questions, args.prefix, device=args.device))
    for r in rows:
        if "failed" in r:
            print(f"| {r['candidates']:,} × {r['questions']} | {r['impl']} | failed ({r['failed']}) | | | |")
            continue
        extra = f" (max abs diff from unchunked {r['max_abs_diff']:.1e})" if "max_abs_diff" in r else ""
        print(f"| {r['candidates']:,} × {r['questions']} | {r['impl']}{extra} | {r['seconds']:.1f} | "
              f"{r['seconds'] / r['questions']:.2f} | {r['peak_above_gb']:.2f} | {r['footprint_gb']:.2f} |")
    for C, Q in compare:
        u, c = (next(r for r in rows if r["impl"] == i and r["candidates"] == C and r["questions"] == Q)
                for i in ("unchunked", "chunked"))
        if "failed" not in u and "failed" not in c:
            print(f"{C} × {Q}: unchunked / chunked time {u['seconds'] / c['seconds']:.2f}, peak memory "
                  f"{u['peak_above_gb'] / max(c['peak_above_gb'], 1e-3):.1f}×")
    big = rows[-1]
    if "failed" not in big:
        tokens = big["tokens"]
        # FLOPs per question: the prefix (P tokens) once, then every token after a candidate's first one
        per_question = (args.prefix + sum(n - 1 for n in tokens)) * 2 * OPT13_PARAMS
        est = per_question / (A100_BF16_FLOPS * ASSUMED_MFU)
        print(f"candidate tokens: mean {sum(tokens) / len(tokens):.2f}, {sum(n > 1 for n in tokens)} of "
              f"{len(tokens)} need the KV-cache path")
        print(f"ESTIMATE (not measured): OPT-1.3B on one A100 at {ASSUMED_MFU:.0%} of bf16 peak: "
              f"{per_question / 1e12:.1f} TFLOP and {est * 1e3:.0f} ms per question, "
              f"{est * VQAV2_VAL_QUESTIONS / 3600:.1f} h for VQAv2 val ({VQAV2_VAL_QUESTIONS:,} questions)")


if __name__ == "__main__":
    main()
