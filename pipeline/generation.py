"""Decoding and answer ranking from soft visual prefixes, through transformers.

A prefix is a sequence of input embeddings (visual tokens, prompt, few-shot
examples). Batches of prefixes of different lengths are left-padded, so every
sequence ends at the last position and decoding continues from there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.lms import LanguageModel


def text_embeds(lm: LanguageModel, text: str) -> torch.Tensor:
    """Input embeddings of `text` without special tokens: (T, D)."""
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(lm.device)
    return lm.embed(ids)


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_i, D)] -> embeds (B, T, D) left-padded with zeros, mask (B, T)."""
    width = max(s.shape[0] for s in sequences)
    embeds = sequences[0].new_zeros((len(sequences), width, sequences[0].shape[1]))
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=sequences[0].device)
    for i, s in enumerate(sequences):
        embeds[i, width - s.shape[0] :] = s
        mask[i, width - s.shape[0] :] = 1
    return embeds, mask


@torch.inference_mode()
def greedy_decode(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Batched greedy decoding after left-padded prefixes (B, T, D); stops at EOS."""
    tok = lm.tokenizer
    out = lm.model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    if not lm.is_encoder_decoder and out.shape[1] > max_new_tokens:  # some versions echo the prompt ids
        out = out[:, -max_new_tokens:]
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


@torch.inference_mode()
def rank_candidates(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, candidates: list[str]) -> torch.Tensor:
    """Log-likelihood of each candidate continuation after each prefix: (B, C).

    The shared prefix runs once: its next-token distribution scores every
    candidate's first token (all of a one-token candidate); only candidates of
    several tokens continue from its KV cache, repeated for them alone and scored
    in one batched call. T5 scores candidates as decoder targets against one
    encoder pass.
    """
    B, C = embeds.shape[0], len(candidates)
    ids, cand_mask = lm.tokenize(candidates)  # (C, L) right-padded
    if lm.is_encoder_decoder:
        enc = lm.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        hidden = enc.last_hidden_state.repeat_interleave(C, 0)
        labels = ids.repeat(B, 1).masked_fill(cand_mask.repeat(B, 1) == 0, -100)
        logits = lm.model(encoder_outputs=(hidden,), attention_mask=mask.repeat_interleave(C, 0), labels=labels).logits
        logp = F.log_softmax(logits.float(), -1).gather(-1, ids.repeat(B, 1).unsqueeze(-1)).squeeze(-1)
        return (logp * cand_mask.repeat(B, 1)).sum(-1).view(B, C)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding -> positions start at 0
    multi = (cand_mask.sum(1) > 1).nonzero().squeeze(1)  # candidates needing more than the next token
    prefix = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=len(multi) > 0,
                      logits_to_keep=1)
    first = F.log_softmax(prefix.logits[:, -1].float(), -1)  # (B, K) next-token distribution after the prefix
    scores = first[:, ids[:, 0]]  # (B, C) log p(first token); complete for one-token candidates
    if len(multi) == 0:
        return scores
    M = len(multi)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(M)  # (B*M, ...) the shared prefix, computed once
    cand_ids, cand_m = ids[multi].repeat(B, 1), cand_mask[multi].repeat(B, 1)  # (B*M, L)
    full_mask = torch.cat([mask.repeat_interleave(M, 0), cand_m], 1)
    cand_pos = positions[:, -1:].repeat_interleave(M, 0) + 1 + torch.arange(ids.shape[1], device=ids.device)
    out = lm.model(input_ids=cand_ids, attention_mask=full_mask, position_ids=cand_pos, past_key_values=cache)
    rest = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, cand_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores[:, multi] += (rest * cand_m[:, 1:]).sum(-1).view(B, M)
    return scores
