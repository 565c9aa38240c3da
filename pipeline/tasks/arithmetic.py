"""Visual semantic arithmetic: z_v(image) - e(a) + e(b), then the nearest test image.

e(word) is the mean input embedding of the word's tokens in its leading-space form
(" red"), L2-normalised like the prototypes, so it lives on the same scale as z_v.
For a colour swap a, b are colours and the shape must stay; for a shape swap the
reverse. The caption of an arithmetic result is decoded from the prefix shifted the
same way token by token: [V - E(a) + E(b) ; prompt] with the raw mean embeddings.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.generation import greedy_decode, text_embeds
from pipeline.tasks.arithmetic_metrics import nearest_neighbours, swap_accuracy
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


@torch.inference_mode()
def evaluate_arithmetic(inputs: EvalInputs, cfg: Config) -> tuple[dict, list[dict]]:
    acfg, lm = cfg.evaluate.arithmetic, inputs.lm
    z_v = inputs.z_v(cfg.evaluate.common.batch_size)  # (n, D)
    prompt = text_embeds(lm, inputs.meta["prompt"])
    metrics, examples = {}, []
    for changed, kept in SWAPS.items():
        queries = swap_queries(inputs, changed, acfg.queries)
        if not queries:
            continue
        rows = np.array([k for k, _, _ in queries])
        e_a = torch.stack([word_embedding(lm, a) for _, a, _ in queries])  # (Q, D)
        e_b = torch.stack([word_embedding(lm, b) for _, _, b in queries])
        shifted = z_v[rows] - F.normalize(e_a, dim=-1) + F.normalize(e_b, dim=-1)  # (Q, D)
        hits = nearest_neighbours(shifted.cpu().numpy(), z_v.cpu().numpy(), exclude=rows)
        targets = [dict(inputs.attributes[inputs.image_ids[k]], **{changed: b}) for k, _, b in queries]
        retrieved = [inputs.attributes[inputs.image_ids[h]] for h in hits]
        metrics[f"{changed}_swap_top1"] = 100.0 * swap_accuracy(retrieved, targets, changed)
        metrics[f"{changed}_swap_queries"] = len(queries)
        # captions decoded from the shifted prefix, for a few examples
        shown = queries[: acfg.examples]
        if shown:
            V = inputs.bridged([k for k, _, _ in shown])  # (s, N, D)
            V = V - e_a[: len(shown), None] + e_b[: len(shown), None]
            embeds = torch.cat([V, prompt.expand(len(shown), -1, -1)], 1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            decoded = greedy_decode(lm, embeds, mask, cfg.evaluate.caption.max_new_tokens)
            for (k, a, b), hit, caption in zip(shown, hits, decoded):
                examples.append({
                    "label": f"{changed}: '{inputs.captions[inputs.image_ids[k]][0]}' - {a} + {b}",
                    "image_path": inputs.image_paths[inputs.image_ids[k]],
                    "generated": f"decoded: {caption}",
                    "references": [f"retrieved: {inputs.captions[inputs.image_ids[hit]][0]}"],
                })
    return metrics, examples
