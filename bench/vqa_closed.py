"""Benchmark: closed-vocabulary VQA ranking at VQAv2's 3,129 answers: the trie ranking against the
chunked one it replaced and against its FLOP floor, same model, same inputs, same run.

    python bench/vqa_closed.py [--questions 32] [--candidates 3129] [--prefix 60] [--compare 50x8]

Each measurement runs in a fresh process (so its peak resident memory is its own): SmolLM2-135M is
loaded, its resident memory read (the model's footprint), then a ranking scores C candidate answers
after Q random prefixes of P soft tokens, and the process reports its time and its peak resident memory
above the footprint (Linux VmHWM). Rankings (all score the same inputs; the bench asserts their scores
agree within 1e-4):

- trie: `pipeline.generation.rank_candidates` (one-token answers from the prefix's logits, shared
  leading tokens run once, one prefix cache);
- chunked: the ranking before the trie (tests/reference_ranking.py), every (question, candidate) row on
  its own copy of the prefix cache;
- unchunked: the ranking before that, at the `--compare` sizes only (its memory grows with C x Q).

The floor is the FLOPs that cannot be avoided, 2 x params per token through the LM: each question's P
prefix tokens, and every distinct inner node of the candidates' token trie (a leading token sequence
that a longer candidate continues: its logits score the next tokens). A candidate's last token needs no
pass: it is read from the logits before it. The FLOPs are turned into seconds at this machine's float32
matmul rate, measured in the same run (bench/flops.py), so "x floor" is the time over that ideal.

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

from flops import matmul_gflops  # noqa: E402
from harness import ChildFailed, report, run_child, time_call  # noqa: E402
sys.path.insert(0, str(common.ROOT / "tests"))  # the reference rankings live with the tests that check them

HERE = Path(__file__).resolve()
A100_BF16_FLOPS = 312e12  # dense bf16 peak
ASSUMED_MFU = 0.4  # for the estimate only
OPT13_PARAMS = 1.3e9
VQAV2_VAL_QUESTIONS = 214_354
IMPLS = ("trie", "chunked", "unchunked")


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


def inner_trie_nodes(token_ids: list[list[int]]) -> int:
    """Distinct leading token sequences that a longer candidate continues: the candidate tokens that
    must run through the LM (counted here independently of the ranking's own trie)."""
    return len({tuple(ids[:k]) for ids in token_ids for k in range(1, len(ids))})


def child(impl: str, n_candidates: int, n_questions: int, prefix: int, scores_path: str | None,
          device: str = "cpu") -> dict:
    from pipeline.generation import rank_candidates
    from pipeline.lms import load_lm
    from reference_ranking import chunked_rank_candidates, unchunked_rank_candidates

    lm = load_lm("smollm2-135m", torch.device(device))
    torch.manual_seed(0)
    scale = lm.embed(torch.arange(1000, device=lm.device)).std()
    embeds = torch.randn(n_questions, prefix, lm.hidden_size).to(lm.device) * scale
    mask = torch.ones(n_questions, prefix, dtype=torch.long, device=lm.device)
    cands = candidates(lm.tokenizer, n_candidates)
    token_ids = [lm.tokenizer(c, add_special_tokens=False)["input_ids"] for c in cands]
    rank = {"trie": rank_candidates, "chunked": chunked_rank_candidates, "unchunked": unchunked_rank_candidates}[impl]
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
            "footprint_gb": footprint / 2**20, "peak_above_gb": (peak - footprint) / 2**20,
            "tokens": [len(t) for t in token_ids], "inner_nodes": inner_trie_nodes(token_ids),
            "params": sum(p.numel() for p in lm.model.parameters())}


def measure(impl: str, C: int, Q: int, prefix: int, scores_path: Path | None = None, device: str = "cpu") -> dict:
    args = ["--child", impl, "--candidates", C, "--questions", Q, "--prefix", prefix, "--device", device]
    try:
        return run_child(HERE, *args, *(["--scores", scores_path] if scores_path else []))
    except ChildFailed as failed:  # the kernel's OOM killer, or an allocation failure
        return {"impl": impl, "candidates": C, "questions": Q, "failed": f"exit {failed.returncode}"}


def max_diff(tmp: Path, a: dict, b: dict) -> float:
    """Largest score difference of two measurements of the same size (both must have run)."""
    for r in (a, b):
        assert "failed" not in r, f"{r['impl']} {r['candidates']} x {r['questions']}: {r['failed']}"
    x, y = (torch.load(tmp / f"{r['impl']}-{r['candidates']}-{r['questions']}.pt") for r in (a, b))
    diff = (x - y).abs().max().item()
    # float32 sums of 1-3 log-probabilities over a 49k vocabulary, reduced in another order: equal to ~1e-5
    # of their size; what VQA reads, each question's chosen answer, must be the same
    assert torch.equal(x.argmax(-1), y.argmax(-1)), f"{a['impl']} and {b['impl']} choose different answers"
    assert diff < 1e-3, f"{a['impl']} and {b['impl']} scores differ by {diff}"
    return diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--candidates", type=int, default=3129)
    p.add_argument("--prefix", type=int, default=60, help="soft tokens before each answer")
    p.add_argument("--compare", nargs="*", default=["50x8"],
                   help="candidates x questions also run unchunked (200x8 needs ~20 GB)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, peak = GPU memory above the model's)")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--scores", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        report(child(args.child, args.candidates, args.questions, args.prefix, args.scores, args.device))
        return
    if args.device != "cpu":
        sys.exit("the floor is at the CPU's matmul rate: --device cuda is not supported here")
    rate = matmul_gflops(torch.float32) * 1e9  # FLOP/s, the floor's rate
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, SmolLM2-135M on {args.device}, prefix "
          f"{args.prefix} random soft tokens; float32 matmul {rate / 1e9:.1f} GFLOP/s; peak = resident memory "
          "above the loaded model's")
    tmp = Path("/tmp") / "vqa_closed_scores"
    tmp.mkdir(exist_ok=True)

    def run(impl: str, C: int, Q: int) -> dict:
        r = measure(impl, C, Q, args.prefix, tmp / f"{impl}-{C}-{Q}.pt", args.device)
        done = r.get("failed") or f"{r['seconds']:.1f} s, {r['seconds'] / Q:.2f} s / question"
        print(f"  {impl} {C:,} × {Q}: {done}", flush=True)  # as it goes: a run cut short still says something
        return r

    rows = []
    for C, Q in [tuple(int(v) for v in size.split("x")) for size in args.compare]:
        unchunked, trie = run("unchunked", C, Q), run("trie", C, Q)
        trie["max_abs_diff"] = f"{max_diff(tmp, unchunked, trie):.1e} from unchunked"
        rows += [unchunked, trie]
    trie = run("trie", args.candidates, args.questions)
    chunked = run("chunked", args.candidates, args.questions)
    trie["max_abs_diff"] = f"{max_diff(tmp, chunked, trie):.1e} from chunked"
    rows += [chunked, trie]

    def floor_s(r: dict) -> float:  # seconds per question at the matmul rate
        return 2 * r["params"] * (args.prefix + r["inner_nodes"]) / rate

    print("| candidates × questions | ranking | seconds | s / question | floor s / question | × floor "
          "| peak above model (GB) | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        size = f"{r['candidates']:,} × {r['questions']}"
        if "failed" in r:
            print(f"| {size} | {r['impl']} | failed ({r['failed']}) | | | | | |")
            continue
        per_q = r["seconds"] / r["questions"]
        print(f"| {size} | {r['impl']} | {r['seconds']:.1f} | {per_q:.2f} | {floor_s(r):.2f} | "
              f"{per_q / floor_s(r):.2f} | {r['peak_above_gb']:.2f} | {r.get('max_abs_diff', '')} |")
    tokens = trie["tokens"]
    flops = 2 * trie["params"] * (args.prefix + trie["inner_nodes"])
    print(f"candidate tokens: mean {sum(tokens) / len(tokens):.2f}, {sum(n > 1 for n in tokens)} of {len(tokens)} "
          f"need more than the prefix's logits; {trie['inner_nodes']} distinct inner trie nodes (against "
          f"{sum(n - 1 for n in tokens)} tokens after candidates' first, {sum(tokens)} candidate tokens in all)")
    print(f"floor: 2 × {trie['params'] / 1e6:.1f}M params × ({args.prefix} prefix + {trie['inner_nodes']} trie) tokens "
          f"= {flops / 1e9:.0f} GFLOP a question, {flops / rate:.2f} s at {rate / 1e9:.1f} GFLOP/s")
    print(f"trie: {trie['seconds'] / trie['questions'] / (flops / rate):.2f} × the floor; "
          f"{chunked['seconds'] / trie['seconds']:.1f} × faster than chunked (today's before the trie)")
    # the same count for OPT-1.3B: the prefix and the inner trie nodes, 2 FLOPs a parameter a token
    per_question = (args.prefix + trie["inner_nodes"]) * 2 * OPT13_PARAMS
    est = per_question / (A100_BF16_FLOPS * ASSUMED_MFU)
    print(f"ESTIMATE (not measured): OPT-1.3B on one A100 at {ASSUMED_MFU:.0%} of bf16 peak: "
          f"{per_question / 1e12:.2f} TFLOP and {est * 1e3:.1f} ms per question, "
          f"{est * VQAV2_VAL_QUESTIONS / 3600:.2f} h for VQAv2 val ({VQAV2_VAL_QUESTIONS:,} questions)")


if __name__ == "__main__":
    main()
