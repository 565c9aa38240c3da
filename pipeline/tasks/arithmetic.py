"""Visual semantic arithmetic: z_v(image) - e(a) + e(b), then the nearest test image.

e(word) is the mean input embedding of the word's tokens in its leading-space form
(" red"), L2-normalised like the prototypes, so it lives on the same scale as z_v.
For a colour swap a, b are colours and the shape must stay; for a shape swap the
reverse (where the data labels colour and shape, as easy-VQA does). A word swap works on any
captions: a is a word of the image's caption, b the word in its place in another evaluated
image's caption that differs in that word only; the nearest image must carry that caption.
The caption of an arithmetic result is decoded from the prefix shifted the same way token by
token: [V - E(a) + E(b) ; prompt] with the raw mean embeddings.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.generation import text_embeds
from pipeline.manifest import ZERO_SHOT, report_group
from pipeline.tasks.arithmetic_metrics import nearest_neighbours, swap_accuracy
from pipeline.tasks.captioning import decode_captions
from pipeline.tasks.inputs import EvalInputs

SWAPS = {"color": "shape", "shape": "color"}  # changed attribute -> the one that must stay


def word_embedding(lm, word: str) -> torch.Tensor:
    """Mean input embedding of ' word' (D,)."""
    return text_embeds(lm, f" {word}").mean(0)


def swap_queries(inputs: EvalInputs, changed: str, limit: int) -> list[tuple[int, str, str]]:
    """(row, a, b): images with both attributes known; b cycles through the other values seen."""
    rows = [k for k, i in enumerate(inputs.image_ids) if {"color", "shape"} <= inputs.attributes[i].keys()]
    values = sorted({inputs.attributes[inputs.image_ids[k]][changed] for k in rows})
    queries = []
    for n, k in enumerate(rows[:limit] if limit else rows):
        a = inputs.attributes[inputs.image_ids[k]][changed]
        others = [v for v in values if v != a]
        if others:
            queries.append((k, a, others[n % len(others)]))
    return queries


def caption_words(caption: str) -> tuple[str, ...]:
    return tuple(caption.lower().split())


def word_swap_queries(inputs: EvalInputs, limit: int) -> list[tuple[int, str, str, tuple[str, ...]]]:
    """(row, a, b, target words): the image's first caption with one word a replaced by b is the caption
    of another evaluated image ("a red circle" -> "a blue circle"); b cycles through the candidates."""
    words = [caption_words(inputs.captions[i][0]) for i in inputs.image_ids]
    known = sorted({caption_words(c) for i in inputs.image_ids for c in inputs.captions[i]})
    queries = []
    for k, source in enumerate(words):
        options = []
        for other in known:
            diff = [p for p, (x, y) in enumerate(zip(source, other)) if x != y] if len(other) == len(source) else []
            if len(diff) == 1:
                options.append((source[diff[0]], other[diff[0]], other))
        if options:
            queries.append((k, *options[len(queries) % len(options)]))
        if limit and len(queries) == limit:
            break
    return queries


@torch.inference_mode()
def evaluate_arithmetic(inputs: EvalInputs, cfg: Config) -> tuple[dict, list[dict], dict]:
    """Attribute swaps (colour, shape: where the data labels them) and caption-word swaps (any captions):
    (metrics, example rows, per-query hits {kind: [{"query", "a", "b", "retrieved", "hit"}]})."""
    acfg, lm = cfg.evaluate.arithmetic, inputs.lm
    z_v = inputs.z_v(cfg.evaluate.common.batch_size)  # (n, D)
    prompt = lm.embed(lm.prompt_ids(inputs.meta["prompt"]))
    metrics, examples, per_query = {}, [], {}

    def run_swaps(kind: str, queries: list[tuple[int, str, str]], is_hit, target_domains: list[str | None]) -> None:
        rows = np.array([k for k, _, _ in queries])
        e_a = torch.stack([word_embedding(lm, a) for _, a, _ in queries])  # (Q, D)
        e_b = torch.stack([word_embedding(lm, b) for _, _, b in queries])
        shifted = z_v[rows] - F.normalize(e_a, dim=-1) + F.normalize(e_b, dim=-1)  # (Q, D)
        hits = nearest_neighbours(shifted.cpu().numpy(), z_v.cpu().numpy(), exclude=rows)
        hit = [bool(is_hit(q, int(h))) for q, h in enumerate(hits)]
        metrics[f"{kind}_swap_top1"] = 100.0 * sum(hit) / len(queries)
        # chance: a uniformly random other image, i.e. the share of the gallery that would be a hit
        n = len(inputs.image_ids)
        metrics[f"chance_{kind}_swap_top1"] = 100.0 * float(np.mean(
            [sum(is_hit(q, j) for j in range(n) if j != k) / max(1, n - 1) for q, (k, _, _) in enumerate(queries)]))
        per_query[kind] = [{"query": inputs.image_ids[k], "a": a, "b": b, "retrieved": inputs.image_ids[int(h)],
                            "hit": ok, "domain": d} for (k, a, b), h, ok, d in zip(queries, hits, hit, target_domains)]
        metrics[f"{kind}_swap_queries"] = len(queries)
        for domain in sorted({d for d in target_domains if d}):  # zero-shot: is the swap's target combination seen?
            chosen = [ok for ok, d in zip(hit, target_domains) if d == domain]
            metrics[f"{kind}_swap_top1_{domain}"] = 100.0 * sum(chosen) / len(chosen)
        # captions decoded from the shifted prefix, for a few examples
        shown = queries[: acfg.examples]
        if shown:
            V = inputs.bridged([k for k, _, _ in shown])  # (s, N, D)
            V = V - e_a[: len(shown), None] + e_b[: len(shown), None]
            decoded = decode_captions(lm, V, prompt, cfg.evaluate.caption.max_new_tokens)
            for (k, a, b), hit, caption in zip(shown, hits, decoded):
                examples.append({
                    "label": f"{kind}: '{inputs.captions[inputs.image_ids[k]][0]}' - {a} + {b}",
                    "image_path": inputs.image_paths[inputs.image_ids[k]],
                    "generated": f"decoded: {caption}",
                    "references": [f"retrieved: {inputs.captions[inputs.image_ids[hit]][0]}"],
                })

    attrs = [{k: v for k, v in inputs.attributes[i].items() if k in SWAPS} for i in inputs.image_ids]
    # colour-shape combination -> seen / unseen (the zero-shot split; a source's own domain says nothing here)
    domain_of = {(a["color"], a["shape"]): inputs.attributes[i][ZERO_SHOT] for i, a in zip(inputs.image_ids, attrs)
                 if ZERO_SHOT in inputs.attributes[i] and SWAPS.keys() <= a.keys()}
    for changed in SWAPS:
        queries = swap_queries(inputs, changed, acfg.queries)
        if queries:
            targets = [dict(attrs[k], **{changed: b}) for k, _, b in queries]
            run_swaps(changed, queries,
                      lambda q, h, targets=targets, changed=changed: swap_accuracy([attrs[h]], [targets[q]], changed),
                      [domain_of.get((t["color"], t["shape"])) for t in targets])
    word_queries = word_swap_queries(inputs, acfg.queries)
    if word_queries:
        def caption_hit(q: int, h: int) -> bool:
            return word_queries[q][3] in {caption_words(c) for c in inputs.captions[inputs.image_ids[h]]}

        domain_of_text = {caption_words(c): report_group(inputs.attributes[i])
                          for i in inputs.image_ids for c in inputs.captions[i]}
        run_swaps("word", [(k, a, b) for k, a, b, _ in word_queries], caption_hit,
                  [domain_of_text.get(target) for _, _, _, target in word_queries])
    return metrics, examples, per_query
