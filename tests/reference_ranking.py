"""Closed-answer ranking as it was before it was chunked: every multi-token candidate of every prefix in
one batch, the prefixes' KV cache repeated for each. Memory grows as prefixes × candidates × prefix
length; kept as the reference the chunked `pipeline.generation.rank_candidates` must equal (the tests)
and as the baseline bench/vqa_closed.py measures against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def unchunked_rank_candidates(lm, embeds: torch.Tensor, mask: torch.Tensor, candidates: list[str]) -> torch.Tensor:
    B = embeds.shape[0]
    ids, cand_mask = lm.tokenize(candidates)  # (C, L) right-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    multi = (cand_mask.sum(1) > 1).nonzero().squeeze(1)
    prefix = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1)
    scores = F.log_softmax(prefix.logits[:, -1].float(), -1)[:, ids[:, 0]]
    M = len(multi)
    if M == 0:
        return scores
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(M)
    cand_ids, cand_m = ids[multi].repeat(B, 1), cand_mask[multi].repeat(B, 1)
    full_mask = torch.cat([mask.repeat_interleave(M, 0), cand_m], 1)
    cand_pos = positions[:, -1:].repeat_interleave(M, 0) + 1 + torch.arange(ids.shape[1], device=ids.device)
    out = lm.model(input_ids=cand_ids, attention_mask=full_mask, position_ids=cand_pos, past_key_values=cache)
    rest = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, cand_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores[:, multi] += (rest * cand_m[:, 1:]).sum(-1).view(B, M)
    return scores
