"""Visual question answering (easy-VQA, VQAv2): open-ended and closed-vocabulary, 0-shot and n-shot.

Query prefix: [shots] [V] "Question: {q} Answer:"; each shot is a training image's
[V] "Question: {q} Answer: {a}\\n" (a: its most common human answer). Open-ended answers are
decoded greedily; closed-vocabulary answers rank the dataset's answer set by LLM log-likelihood,
the query's prefix run once for both (KV cache). With a decoder-only LM the n-shot examples, the
same for every query, run through the LM once for the whole evaluation (`SharedPrefix`), and an
image's visual tokens once per batch for all the questions about it (`prefill_shared_leads`). Accuracy
is reported per image domain where the test images have one (zero-shot: seen / unseen) and per
question type: VQAv2's answer type (yes_no, number, other) where the data has one,
else easy-VQA's (color, shape, yes_no).
"""
from __future__ import annotations

import random
import re
from collections import Counter

import torch
from tqdm import tqdm

from pipeline.distributed import Ranks, gather_in_order, shard
from pipeline.generation import SharedPrefix, greedy_decode, prefill_shared_leads, rank_candidates, text_embeds
from pipeline.manifest import report_group
from pipeline.tasks.inputs import EvalInputs
from pipeline.tasks.vqa_metrics import accuracy_by_type, normalize_answer, question_type, vqa_accuracy


def query_text(question: str) -> str:
    return f" Question: {question} Answer:"


def first_answer(generated: str) -> str:
    """The answer part of an open-ended generation: up to the first line break, comma or full stop
    ("no, there is" -> "no"), as generative VQA evaluations usually cut it."""
    return re.split(r"[\n,.]", generated.strip(), maxsplit=1)[0].strip()


def select_questions(questions: list[dict], image_ids: list[str], limit: int, seed: int) -> list[dict]:
    keep = set(image_ids)
    pool = [q for q in questions if q["image_id"] in keep]
    if limit and len(pool) > limit:
        pool = sorted(random.Random(seed).sample(pool, limit), key=lambda q: q["question_id"])
    return pool


def shots_prefix(lm, shot_tokens: list[torch.Tensor], shots: list[dict], bridge) -> SharedPrefix:
    """The n-shot examples, each [V] Question: q Answer: a\\n, as the prefix every query shares."""
    parts = []
    for tokens, shot in zip(shot_tokens, shots):
        with torch.inference_mode():
            parts.append(bridge(tokens.to(lm.device, torch.float32)))
        parts.append(text_embeds(lm, query_text(shot["question"]) + f" {shot_answer(shot)}\n"))
    return SharedPrefix(lm, torch.cat(parts) if parts else torch.zeros((0, lm.hidden_size), device=lm.device))


def shot_answer(question: dict) -> str:
    """The answer a shot shows: the most common human answer (the first on a tie; easy-VQA's only one)."""
    return Counter(question["answers"]).most_common(1)[0][0]


def answer_questions(inputs: EvalInputs, questions: list[dict], shot_prefix: SharedPrefix, answer_set: list[str],
                     batch_size: int, max_new_tokens: int, ranks: Ranks = Ranks()) -> list[dict] | None:
    """One record per question with the open-ended and the closed-vocabulary answer. On several ranks each
    answers its shard of the batches and rank 0 gets every record, in question order (None on the others)."""
    lm, row_of = inputs.lm, {i: k for k, i in enumerate(inputs.image_ids)}
    candidates = [f" {a}" for a in answer_set]
    records = []
    for i in tqdm(shard(range(0, len(questions), batch_size), ranks), desc=f"vqa {inputs.method}", unit="batch"):
        batch = questions[i : i + batch_size]
        images = list(dict.fromkeys(q["image_id"] for q in batch))  # each image's tokens run once for its questions
        V = inputs.bridged([row_of[i] for i in images])  # (u, N, D)
        lead_of = [images.index(q["image_id"]) for q in batch]
        state = prefill_shared_leads(lm, V, lead_of, [text_embeds(lm, query_text(q["question"])) for q in batch],
                                     shot_prefix)
        open_answers = greedy_decode(lm, state.embeds, state.mask, max_new_tokens, cache=state.cache_copy())
        closed = rank_candidates(lm, state.embeds, state.mask, candidates, cache=state.cache).argmax(-1).tolist()
        for q, generated, c in zip(batch, open_answers, closed):
            records.append({
                "question_id": q["question_id"], "question": q["question"], "answers": q["answers"],
                "question_type": question_type(q), "domain": report_group(inputs.attributes[q["image_id"]]),
                "open": first_answer(generated), "closed": answer_set[c],
                "open_accuracy": vqa_accuracy(first_answer(generated), q["answers"]),
                "closed_accuracy": vqa_accuracy(answer_set[c], q["answers"]),
            })
    return gather_in_order(records, ranks)


def summarise(records: list[dict], tag: str) -> dict[str, float]:
    """Accuracy (%) of open and closed answers, overall and per question type."""
    out = {}
    for mode in ("open", "closed"):
        rows = [{"question_type": r["question_type"], "accuracy": r[f"{mode}_accuracy"]} for r in records]
        out[f"{tag}_{mode}_accuracy"] = 100.0 * sum(r["accuracy"] for r in rows) / max(1, len(rows))
        out |= {f"{tag}_{mode}_{qtype}_accuracy": 100.0 * acc for qtype, acc in accuracy_by_type(rows).items()}
        for domain in sorted({r["domain"] for r in records if r.get("domain")}):  # zero-shot: seen / unseen
            chosen = [r[f"{mode}_accuracy"] for r in records if r.get("domain") == domain]
            out[f"{tag}_{mode}_accuracy_{domain}"] = 100.0 * sum(chosen) / len(chosen)
    return out


def chance_accuracy(questions: list[dict], answer_set: list[str]) -> float:
    """VQA accuracy (%) of an answer drawn uniformly from the closed answer set."""
    per_question = [sum(vqa_accuracy(a, q["answers"]) for a in answer_set) / len(answer_set) for q in questions]
    return 100.0 * sum(per_question) / max(1, len(per_question))


def answer_vocabulary(questions: list[dict], limit: int = 0) -> list[str]:
    """The closed-vocabulary candidates: every normalised answer, or the `limit` most frequent
    (VQAv2 evaluations usually rank its 3,129 most frequent answers), sorted."""
    counts = Counter(normalize_answer(a) for q in questions for a in q["answers"])
    kept = sorted(counts, key=lambda a: (-counts[a], a))[: limit or None]
    return sorted(kept)
