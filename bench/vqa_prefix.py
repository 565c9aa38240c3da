"""Benchmark: n-shot VQA with the shared prefix and each batch prefilled once, against every query run
whole, same model, same questions, same run.

    python bench/vqa_prefix.py [--questions 64] [--shots 1] [--batch-size 32]

Questions, shots and the answer set are the VQA stage's (evaluate.common.seed, easy-VQA test questions
on the first cached test images), bridged by the trained vlap bridge (data/models/vlap/; run
`dvc repro train@vlap` first). Ours is pipeline.tasks.vqa.answer_questions: the shots run through
SmolLM2 once (`SharedPrefix`), and each batch's [V] question is prefilled once for both the open
answer (greedy decoding) and the closed one (candidate ranking). The reference runs [shots][V]
question whole twice per batch, once for each, as the stage did before. The bench asserts both give
the same open answers and the same closed answers, and prints seconds and the ratio.
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (offline, repo root, allocator)
import torch  # noqa: E402

from harness import time_calls  # noqa: E402
from pipeline.manifest import read_questions  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.generation import greedy_decode, left_pad, rank_candidates, text_embeds  # noqa: E402
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    cfg, dirs = load_config(), Dirs()
    test_questions = read_questions(dirs.prepared, "test")
    inputs = load_eval_inputs(cfg, "vlap", dirs, only={q["image_id"] for q in test_questions})
    questions = select_questions(test_questions, inputs.image_ids, args.questions, cfg.evaluate.common.seed)
    answer_set = answer_vocabulary(test_questions + read_questions(dirs.prepared, "train"))
    shots, shot_tokens = pick_shots(dirs, args.shots, cfg.evaluate.common.seed)
    max_new = cfg.evaluate.vqa.max_new_tokens
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, smollm2-135m, trained vlap bridge, "
          f"{len(questions)} questions, {args.shots} shot(s), batch {args.batch_size}, "
          f"{len(answer_set)} candidate answers, <= {max_new} new tokens\n")
    prefix = None

    def ours_path() -> list[dict]:
        nonlocal prefix  # the reference runs on the shots' embeddings this path just computed
        prefix = shots_prefix(inputs.lm, shot_tokens, shots, inputs.bridge)
        return answer_questions(inputs, questions, prefix, answer_set, args.batch_size, max_new)

    # alternated, a warm-up round then a timed one: both paths see the same load; the timed round is reported
    ours_run, reference_run = time_calls(
        [ours_path, lambda: whole_sequences(inputs, questions, prefix.embeds, answer_set, args.batch_size, max_new)],
        repeats=1, warmup=1)
    timings = {"ours": ours_run.median, "reference": reference_run.median}
    records, reference = ours_run.result, reference_run.result
    ours = [(r["open"], r["closed"]) for r in records]
    same_open = sum(a[0] == b[0] for a, b in zip(ours, reference))
    same_closed = sum(a[1] == b[1] for a, b in zip(ours, reference))
    print("| path | seconds | questions/s |")
    print("|---|---:|---:|")
    print(f"| whole sequences, run twice per batch (reference) | {timings['reference']:.2f} | "
          f"{len(questions) / timings['reference']:.2f} |")
    print(f"| shared prefix once + batch prefilled once (ours) | {timings['ours']:.2f} | "
          f"{len(questions) / timings['ours']:.2f} |")
    print(f"\nreference / ours: {timings['reference'] / timings['ours']:.2f}x; same open answers "
          f"{same_open}/{len(ours)}, same closed answers {same_closed}/{len(ours)}")
    assert same_open == same_closed == len(ours), "the two paths answer differently"


if __name__ == "__main__":
    main()
