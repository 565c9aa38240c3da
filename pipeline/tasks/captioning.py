"""Image captioning: greedy decoding from [V ; prompt], scored by pycocoevalcap."""
from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.distributed import Ranks, gather_in_order, shard
from pipeline.generation import greedy_decode
from pipeline.tasks.caption_metrics import caption_scores
from pipeline.tasks.inputs import EvalInputs


def decode_captions(lm, V: torch.Tensor, prompt_embeds: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy captions after [V ; prompt] for a batch of visual prefixes V (b, N, D), prompt (P, D);
    all prefixes have the same length N + P, so no padding."""
    embeds = torch.cat([V, prompt_embeds.expand(V.shape[0], -1, -1)], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return greedy_decode(lm, embeds, mask, max_new_tokens)


def generate_captions(inputs: EvalInputs, prompt: str, batch_size: int, max_new_tokens: int,
                      ranks: Ranks = Ranks()) -> dict[str, str] | None:
    """image id -> generated caption, batched, in image order. On several ranks each decodes its shard of the
    batches (the batches one process decodes) and rank 0 gets them all; the other ranks get None."""
    prompt_embeds = inputs.lm.embed(inputs.lm.prompt_ids(prompt))  # (P, D), as training led the captions
    out: list[tuple[str, str]] = []
    n = len(inputs.image_ids)
    for i in tqdm(shard(range(0, n, batch_size), ranks), desc=f"caption {inputs.method}", unit="batch"):
        V = inputs.bridged(slice(i, i + batch_size))  # (b, N, D)
        out.extend(zip(inputs.image_ids[i : i + batch_size], decode_captions(inputs.lm, V, prompt_embeds,
                                                                            max_new_tokens)))
    gathered = gather_in_order(out, ranks)
    return None if gathered is None else dict(gathered)


def evaluate_captioning(inputs: EvalInputs, cfg: Config,
                        ranks: Ranks = Ranks()) -> tuple[dict, dict[str, str]] | None:
    """Metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and the generated captions; on rank 0 only (None on the
    other ranks, which decode their shards)."""
    ecfg = cfg.evaluate
    generated = generate_captions(inputs, inputs.meta["prompt"], ecfg.common.batch_size, ecfg.caption.max_new_tokens,
                                  ranks)
    if generated is None:
        return None
    scores = caption_scores(inputs.captions, generated)
    return scores | {"images": len(generated)}, generated
