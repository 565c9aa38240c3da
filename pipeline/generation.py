"""Decoding and answer ranking from soft visual prefixes, through transformers.

A prefix is a sequence of input embeddings (visual tokens, prompt, few-shot
examples). Batches of prefixes of different lengths are left-padded, so every
sequence ends at the last position and decoding continues from there.

With a decoder-only LM the work a batch shares is done once: `SharedPrefix` runs
embeddings that lead every sequence (the n-shot examples) through the LM a single
time, and `prefill` runs a batch's own embeddings (all but the last position) once,
so that greedy decoding and answer ranking both continue from the same KV cache.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

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


def with_cache(model: torch.nn.Module, cache: Any) -> dict:
    """`cache` under the KV-cache keyword the model's forward takes (`cache` in newer transformers,
    `past_key_values` before; the old name still works but warns)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


class SharedPrefix:
    """Embeddings (P, D) that lead every sequence of every batch, e.g. the n-shot examples.

    A decoder-only LM runs them once, here; each batch then starts from a copy of that KV cache
    (causal attention: the prefix's keys and values do not depend on what follows). An
    encoder-decoder LM reads its input bidirectionally, so for it the prefix is prepended to
    every sequence instead."""

    def __init__(self, lm: LanguageModel, embeds: torch.Tensor):
        self.embeds, self.cache = embeds, None
        if not lm.is_encoder_decoder and len(embeds):
            with torch.inference_mode():
                # the body alone: the prefix's keys and values are what is kept, not its logits
                self.cache = lm.model.base_model(inputs_embeds=embeds[None], use_cache=True).past_key_values

    def __len__(self) -> int:
        return len(self.embeds)


@dataclass
class Prefilled:
    """A left-padded batch (after any shared prefix) and, for a decoder-only LM, the KV cache of all
    but its last position: `greedy_decode` and `rank_candidates` continue from it (each consumes a
    cache, hence `cache_copy`)."""

    embeds: torch.Tensor  # (B, T, D), the whole input including a shared prefix
    mask: torch.Tensor  # (B, T)
    cache: Any | None

    def cache_copy(self) -> Any | None:
        return copy.deepcopy(self.cache)


@torch.inference_mode()
def prefill(lm: LanguageModel, sequences: list[torch.Tensor], prefix: SharedPrefix | None = None) -> Prefilled:
    """[(T_i, D)] after `prefix`: left-padded, and run through a decoder-only LM up to the last position.

    With a cached prefix the batch is laid out [prefix][padding][sequence]; the mask hides the
    padding and positions count only unmasked tokens, so every row sees exactly prefix + sequence."""
    B = len(sequences)
    if prefix is None or prefix.cache is None:
        lead = [] if prefix is None or not len(prefix) else [prefix.embeds]
        embeds, mask = left_pad([torch.cat([*lead, s]) for s in sequences])
        cache, done = None, 0
    else:
        embeds, mask = left_pad(sequences)
        embeds = torch.cat([prefix.embeds.expand(B, -1, -1), embeds], 1)
        mask = torch.cat([mask.new_ones((B, len(prefix))), mask], 1)
        cache, done = copy.deepcopy(prefix.cache), len(prefix)
        cache.batch_repeat_interleave(B)
    if lm.is_encoder_decoder or embeds.shape[1] - 1 <= done:
        return Prefilled(embeds, mask, cache)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm.model.base_model(inputs_embeds=embeds[:, done:-1], attention_mask=mask[:, :-1],
                              position_ids=positions[:, done:-1], use_cache=True, **with_cache(lm.model, cache))
    return Prefilled(embeds, mask, out.past_key_values)


@torch.inference_mode()
def greedy_decode(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  cache: Any | None = None) -> list[str]:
    """Batched greedy decoding after left-padded prefixes (B, T, D); stops at EOS. `cache`: the KV
    cache of the first positions of `embeds` (from `prefill`), which are then not run again."""
    tok = lm.tokenizer
    out = lm.model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        **(with_cache(lm.model, cache) if cache is not None else {}),
    )
    if not lm.is_encoder_decoder and out.shape[1] > max_new_tokens:  # some versions echo the prompt ids
        out = out[:, -max_new_tokens:]
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


# Scoring memory per chunk of (question, candidate) rows, above the model and the prefixes' own cache.
RANKING_MEMORY = 1 << 30


@torch.inference_mode()
def rank_candidates(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, candidates: list[str],
                    cache: Any | None = None, memory: int = RANKING_MEMORY) -> torch.Tensor:
    """Log-likelihood of each candidate continuation after each prefix: (B, C). `cache`: as in
    `greedy_decode` (decoder-only LMs).

    The prefixes run once: their next-token distributions score every candidate's first token (all
    of a one-token candidate). Candidates of several tokens continue from that KV cache in chunks of
    (prefix, candidate) rows of one token length, as many rows as `memory` bytes hold, so peak
    memory stays one chunk whatever the number of candidates (3,129 for VQAv2's closed set). T5
    scores candidates as decoder targets against one encoder pass, in chunks the same way.
    """
    B, C = embeds.shape[0], len(candidates)
    ids, cand_mask = lm.tokenize(candidates)  # (C, L) right-padded
    lengths = cand_mask.sum(1)
    if lm.is_encoder_decoder:
        hidden = lm.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, D)
        scores = embeds.new_zeros((B, C), dtype=torch.float32)
        per_row = _bytes_per_row(lm, hidden.shape[1], int(lengths.max()), hidden.element_size() * hidden.shape[-1])
        for rows, cands, n in _chunks(B, lengths, range(C), memory // per_row):
            target = ids[cands, :n]
            logits = lm.model(encoder_outputs=(hidden[rows],), attention_mask=mask[rows], labels=target).logits
            scores[rows, cands] = _token_logp(logits, target).sum(-1)
        return scores
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding -> positions start at 0
    multi = (lengths > 1).nonzero().squeeze(1).tolist()  # candidates needing more than the next token
    done = 0 if cache is None else cache.get_seq_length()
    prefix = lm.model(inputs_embeds=embeds[:, done:], attention_mask=mask, position_ids=positions[:, done:],
                      use_cache=len(multi) > 0, logits_to_keep=1, **with_cache(lm.model, cache))
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
                       **with_cache(lm.model, _cache_rows(cache, rows)))
        scores[rows, cands] += _token_logp(out.logits[:, :-1], cand_ids[:, 1:]).sum(-1)
    return scores


def _token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of each target token: (R, n)."""
    return F.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _bytes_per_row(lm: LanguageModel, prefix_len: int, max_len: int, cache_per_token: int) -> int:
    """What one (prefix, candidate) row of a chunk holds at its peak: its copy of the prefix's KV cache
    twice (the copy, and the copy extended by the candidate), and its vocabulary logits three times
    (the model's, float32, log-softmax)."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    return max(1, 2 * cache_per_token * (prefix_len + max_len) + 3 * 4 * max_len * vocab)


def _chunks(B: int, lengths: torch.Tensor, candidates, rows_per_chunk: int):
    """(prefix rows, candidate indices, token length) chunks of at most `rows_per_chunk` (prefix,
    candidate) pairs, each of candidates of one token length."""
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
    if hasattr(cache, "layers"):  # a shallow copy: selecting rows makes new tensors, never writes the old
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out
