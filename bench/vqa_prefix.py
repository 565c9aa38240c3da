"""Benchmark: n-shot VQA with the shared prefix, each image's tokens run once for its questions and each
batch prefilled once, against the same with every row prefilled whole, and against every query run whole,
same model, same questions, same run.

    python bench/vqa_prefix.py [--questions 64] [--shots 1] [--batch-size 32] [--order sampled|split]

Questions, shots and the answer set are the VQA stage's, bridged by the trained vlap bridge
(data/models/vlap/; run `dvc repro train@vlap` first). `--order sampled` (the default run's): the stage's
sample of easy-VQA test questions (evaluate.common.seed), nearly one per image; `--order split`: the first
N questions of the whole test split in its order, as `--vqa-questions 0` (the study) evaluates them, about
ten per image. Ours is pipeline.tasks.vqa.answer_questions: the shots run through SmolLM2 once
(`SharedPrefix`); in each batch every distinct image's [V] runs once after them and serves each question
about it, then the questions' text (`prefill_shared_leads`), once for both the open answer (greedy
decoding) and the closed one (candidate ranking). "Rows prefilled" is the stage before that: each batch's
[V] question rows prefilled whole after the shared prefix. The reference runs [shots][V] question whole
twice per batch, once for each answer, as the stage did before either. The bench asserts all three give
the same open and closed answers, and prints seconds and the ratios.
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402

from harness import time_calls  # noqa: E402
from pipeline.manifest import read_questions  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.generation import greedy_decode, left_pad, prefill, rank_candidates, text_embeds  # noqa: E402
from pipeline.paths import Dirs  # noqa: E402
from pipeline.tasks.inputs import load_eval_inputs  # noqa: E402
from pipeline.tasks.vqa import (answer_questions, answer_vocabulary, first_answer, query_text,  # noqa: E402
                                select_questions, shots_prefix)
from stages.evaluate_vqa import pick_shots  # noqa: E402


def whole_sequences(inputs, questions, shots: torch.Tensor, answer_set, batch_size, max_new_tokens) -> list[tuple]:
    """(open, closed) per question, every [shots][V] question run whole for each of the two answers."""
    lm, row_of = inputs.lm, {i: k for k, i in enumerate(inputs.image_ids)}
    candidates, out = [f" {a}" for a in answer_set], []
    for i in range(0, len(questions), batch_size):
        batch = questions[i: i + batch_size]
        V = inputs.bridged([row_of[q["image_id"]] for q in batch])
        embeds, mask = left_pad([torch.cat([shots, V[k], text_embeds(lm, query_text(q["question"]))])
                                 for k, q in enumerate(batch)])
        opens = greedy_decode(lm, embeds, mask, max_new_tokens)
        closed = rank_candidates(lm, embeds, mask, candidates).argmax(-1).tolist()
        out += [(first_answer(o), answer_set[c]) for o, c in zip(opens, closed)]
    return out


def rows_prefilled(inputs, questions, prefix, answer_set, batch_size, max_new_tokens) -> list[tuple]:
    """(open, closed) per question, each batch's [V] question rows prefilled whole after the shared prefix
    (no image's tokens shared between its questions)."""
    lm, row_of = inputs.lm, {i: k for k, i in enumerate(inputs.image_ids)}
    candidates, out = [f" {a}" for a in answer_set], []
    for i in range(0, len(questions), batch_size):
        batch = questions[i: i + batch_size]
        V = inputs.bridged([row_of[q["image_id"]] for q in batch])
        state = prefill(lm, [torch.cat([V[k], text_embeds(lm, query_text(q["question"]))])
                             for k, q in enumerate(batch)], prefix)
        opens = greedy_decode(lm, state.embeds, state.mask, max_new_tokens, cache=state.cache_copy())
        closed = rank_candidates(lm, state.embeds, state.mask, candidates, cache=state.cache).argmax(-1).tolist()
        out += [(first_answer(o), answer_set[c]) for o, c in zip(opens, closed)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--order", choices=("sampled", "split"), default="sampled",
                   help="the stage's sampled questions, or the first N of the whole split in its order")
    args = p.parse_args()
    cfg, dirs = load_config(), Dirs()
    test_questions = read_questions(dirs.prepared, "test")
    inputs = load_eval_inputs(cfg, "vlap", dirs, only={q["image_id"] for q in test_questions})
    if args.order == "sampled":
        questions = select_questions(test_questions, inputs.image_ids, args.questions, cfg.evaluate.common.seed)
    else:
        questions = select_questions(test_questions, inputs.image_ids, 0, cfg.evaluate.common.seed)[:args.questions]
    answer_set = answer_vocabulary(test_questions + read_questions(dirs.prepared, "train"))
    shots, shot_tokens = pick_shots(dirs, args.shots, cfg.evaluate.common.seed)
    max_new = cfg.evaluate.vqa.max_new_tokens
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, smollm2-135m, trained vlap bridge, "
          f"{len(questions)} questions ({args.order}) on {len({q['image_id'] for q in questions})} images, "
          f"{args.shots} shot(s), batch {args.batch_size}, {len(answer_set)} candidate answers, "
          f"<= {max_new} new tokens\n")
    prefix = shots_prefix(inputs.lm, shot_tokens, shots, inputs.bridge)
    # alternated, a warm-up round then a timed one: all paths see the same load; the timed round is reported
    runs = dict(zip(("ours", "rows", "reference"), time_calls([
        lambda: [(r["open"], r["closed"]) for r in answer_questions(inputs, questions, prefix, answer_set,
                                                                     args.batch_size, max_new)],
        lambda: rows_prefilled(inputs, questions, prefix, answer_set, args.batch_size, max_new),
        lambda: whole_sequences(inputs, questions, prefix.embeds, answer_set, args.batch_size, max_new)],
        repeats=1, warmup=1)))
    labels = {"reference": "whole sequences, run twice per batch (reference)",
              "rows": "shared prefix once + rows prefilled once per batch",
              "ours": "shared prefix once + each image once + questions prefilled once per batch (ours)"}
    print("| path | seconds | questions/s |")
    print("|---|---:|---:|")
    for name in ("reference", "rows", "ours"):
        print(f"| {labels[name]} | {runs[name].median:.2f} | {len(questions) / runs[name].median:.2f} |")
    ours = runs["ours"].result
    print(f"\nreference / ours: {runs['reference'].median / runs['ours'].median:.2f}x; "
          f"rows prefilled / ours: {runs['rows'].median / runs['ours'].median:.2f}x")
    for name in ("rows", "reference"):
        other = runs[name].result
        same_open, same_closed = (sum(a[k] == b[k] for a, b in zip(ours, other)) for k in (0, 1))
        print(f"same answers as {name}: open {same_open}/{len(ours)}, closed {same_closed}/{len(ours)}")
        assert same_open == same_closed == len(ours), f"ours and {name} answer differently"


if __name__ == "__main__":
    main()
