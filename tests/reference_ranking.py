"""Closed-answer rankings the pipeline used before, kept as references that the trie ranking
`pipeline.generation.rank_candidates` must equal (the tests) and as baselines bench/vqa_closed.py
measures against:

- `unchunked_rank_candidates`: every multi-token candidate of every prefix in one batch, the prefixes'
  KV cache repeated for each. Memory grows as prefixes x candidates x prefix length.
- `chunked_rank_candidates`: the same (prefix, candidate) rows in chunks of a byte budget, each row with
  its own copy of its prefix's cache and every candidate token run through the LM (the ranking before
  the trie: no work shared between candidates).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

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


@torch.inference_mode()
def chunked_rank_candidates(lm, embeds: torch.Tensor, mask: torch.Tensor, candidates: list[str],
                            cache: Any | None = None, memory: int = 1 << 30) -> torch.Tensor:
    """Decoder-only LMs: the prefixes once, then multi-token candidates in chunks of (prefix, candidate)
    rows of one token length, as many as `memory` bytes hold, each row on a copy of its prefix's cache."""
    B = embeds.shape[0]
    ids, cand_mask = lm.tokenize(candidates)  # (C, L) right-padded
    lengths = cand_mask.sum(1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding -> positions start at 0
    multi = (lengths > 1).nonzero().squeeze(1).tolist()  # candidates needing more than the next token
    done = 0 if cache is None else cache.get_seq_length()
    prefix = lm.model(inputs_embeds=embeds[:, done:], attention_mask=mask, position_ids=positions[:, done:],
                      use_cache=len(multi) > 0, logits_to_keep=1, **_with_cache(lm.model, cache))
    first = F.log_softmax(prefix.logits[:, -1].float(), -1)  # (B, K) next-token distribution after the prefix
    scores = first[:, ids[:, 0]]  # (B, C) log p(first token); complete for one-token candidates
    if not multi:
        return scores
    cache = prefix.past_key_values
    cache_row = sum(t.numel() * t.element_size() for t in _cache_tensors(cache)) // B
    per_row = _bytes_per_row(lm, embeds.shape[1], int(lengths.max()), cache_row // max(embeds.shape[1], 1))
    for rows, cands, n in _chunks(B, lengths, multi, memory // per_row):
        cand_ids = ids[cands, :n]  # (R, n), one length: no padding
        full_mask = torch.cat([mask[rows], mask.new_ones((len(rows), n))], 1)
        cand_pos = positions[rows, -1:] + 1 + torch.arange(n, device=ids.device)
        out = lm.model(input_ids=cand_ids, attention_mask=full_mask, position_ids=cand_pos,
                       **_with_cache(lm.model, _cache_rows(cache, rows)))
        logp = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, cand_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores[rows, cands] += logp.sum(-1)
    return scores


def _with_cache(model: torch.nn.Module, cache: Any) -> dict:
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _bytes_per_row(lm, prefix_len: int, max_len: int, cache_per_token: int) -> int:
    """One (prefix, candidate) row at its peak: its cache copy twice, its vocabulary logits three times."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    return max(1, 2 * cache_per_token * (prefix_len + max_len) + 3 * 4 * max_len * vocab)


def _chunks(B: int, lengths: torch.Tensor, candidates, rows_per_chunk: int):
    """(prefix rows, candidate indices, token length) chunks of at most `rows_per_chunk` pairs."""
    size = max(1, rows_per_chunk)
    by_length: dict[int, list[int]] = {}
    for c in candidates:
        by_length.setdefault(int(lengths[c]), []).append(c)
    for n, group in sorted(by_length.items()):
        pairs = torch.tensor([(b, c) for b in range(B) for c in group], device=lengths.device)
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            yield part[:, 0], part[:, 1], n


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return [*cache.key_cache, *cache.value_cache]


def _cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache of the given batch rows (repeats allowed); `cache` itself is left as it is."""
    if hasattr(cache, "layers"):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out
