"""Decoding and answer ranking from soft visual prefixes, through transformers.

A prefix is a sequence of input embeddings (visual tokens, prompt, few-shot
examples). Batches of prefixes of different lengths are left-padded, so every
sequence ends at the last position and decoding continues from there.

With a decoder-only LM the work a batch shares is done once: `SharedPrefix` runs
embeddings that lead every sequence (the n-shot examples) through the LM a single
time, and `prefill` runs a batch's own embeddings (all but the last position) once,
so that greedy decoding and answer ranking both continue from the same KV cache;
`prefill_shared_leads` also runs once what several rows of a batch share after the
prefix (an image's visual tokens, read by each question about it).
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
        return Prefilled(embeds, mask, None if lm.is_encoder_decoder else _run_after(lm, embeds, mask, None, 0))
    embeds, mask = left_pad(sequences)
    embeds = torch.cat([prefix.embeds.expand(B, -1, -1), embeds], 1)
    mask = torch.cat([mask.new_ones((B, len(prefix))), mask], 1)
    return Prefilled(embeds, mask, _run_after(lm, embeds, mask, _repeated(prefix, B), len(prefix)))


def _repeated(prefix: SharedPrefix, rows: int) -> Any:
    """A copy of the prefix's cache for `rows` rows (generation extends a cache in place)."""
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(rows)
    return cache


def _run_after(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, cache: Any, done: int) -> Any:
    """The cache of every position but the last: positions `done`.. run after `cache` (which holds the
    first `done`), counting only unmasked tokens, so that left padding does not shift a row."""
    if embeds.shape[1] - 1 <= done:
        return cache
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm.model.base_model(inputs_embeds=embeds[:, done:-1], attention_mask=mask[:, :-1],
                               position_ids=positions[:, done:-1], use_cache=True,
                               **with_cache(lm.model, cache)).past_key_values


@torch.inference_mode()
def prefill_shared_leads(lm: LanguageModel, leads: torch.Tensor, lead_of: list[int], texts: list[torch.Tensor],
                         prefix: SharedPrefix | None = None) -> Prefilled:
    """Rows [prefix][leads[lead_of[i]]][texts[i]] where rows share leads (U, N, D) of one length, as the
    questions about one image share its visual tokens: `prefill` of the whole rows, with less work.

    A decoder-only LM runs each distinct lead once, after the prefix, and its keys and values serve every
    row that reads it (causal attention: a lead's do not depend on what follows); then each row's text,
    left-padded after its lead, up to the last position. The padding between lead and text is masked and
    not counted in the positions, so every row sees exactly prefix + lead + text. An encoder-decoder LM
    reads its input whole: it gets the whole rows."""
    rows = [torch.cat([leads[j], t]) for j, t in zip(lead_of, texts)] if lm.is_encoder_decoder else None
    if rows is not None:
        return prefill(lm, rows, prefix)
    U, N = leads.shape[:2]
    P = 0 if prefix is None else len(prefix)
    cache = _repeated(prefix, U) if P else None
    lead_positions = torch.arange(P, P + N, device=leads.device).expand(U, -1)
    cache = lm.model.base_model(inputs_embeds=leads, attention_mask=leads.new_ones((U, P + N), dtype=torch.long),
                                position_ids=lead_positions, use_cache=True,
                                **with_cache(lm.model, cache)).past_key_values
    index = torch.tensor(lead_of, device=leads.device)
    cache.batch_select_indices(index)  # each row's copy of its lead's keys and values
    text_embeds_, text_mask = left_pad(texts)
    B = len(texts)
    embeds = torch.cat([*([prefix.embeds.expand(B, -1, -1)] if P else []), leads[index], text_embeds_], 1)
    mask = torch.cat([text_mask.new_ones((B, P + N)), text_mask], 1)
    return Prefilled(embeds, mask, _run_after(lm, embeds, mask, cache, P + N))


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


# Scoring memory per chunk, above the model and the prefixes' own cache.
RANKING_MEMORY = 1 << 30
# Most trie nodes one forward takes. Each node attends to the whole chunk under a mask (all but its own
# ancestors masked out), so the wasted attention grows with the chunk: at 128 it is ~5% of a node's FLOPs
# (SmolLM2-135M), and the chunk's rows (prefixes x nodes) are still enough for efficient matmuls.
TRIE_CHUNK = 128


@torch.inference_mode()
def rank_candidates(lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, candidates: list[str],
                    cache: Any | None = None, memory: int = RANKING_MEMORY) -> torch.Tensor:
    """Log-likelihood of each candidate continuation after each prefix: (B, C). `cache`: as in
    `greedy_decode` (decoder-only LMs; it is consumed).

    A decoder-only LM does only the work the candidates do not share. The prefixes run once, and their
    next-token distributions score every candidate's first token: a one-token candidate needs no other
    forward. The candidates' tokens form a trie, and only its inner nodes (leading tokens that a longer
    candidate continues) run through the LM: each once for all the candidates that share it, all the
    prefixes' rows together, over the one prefix cache. A candidate scores the sum of the
    log-probabilities along its path. Nodes run in chunks of at most TRIE_CHUNK, as many as `memory`
    bytes hold, so peak memory stays one chunk whatever the number of candidates (3,129 for VQAv2's
    closed set). T5 scores candidates as decoder targets against one encoder pass, in chunks of
    (prefix, candidate) rows.
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
    trie = _Trie([row[:n] for row, n in zip(ids.tolist(), lengths.tolist())])
    device = ids.device
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding -> positions start at 0
    done = 0 if cache is None else cache.get_seq_length()
    prefix = lm.model(inputs_embeds=embeds[:, done:], attention_mask=mask, position_ids=positions[:, done:],
                      use_cache=bool(trie.inner), logits_to_keep=1, **with_cache(lm.model, cache))
    # edge[:, v]: log p(node v's token | prefix, v's ancestors); the last column, 0, pads the paths
    edge = embeds.new_zeros((B, len(trie.token) + 1), dtype=torch.float32)
    first = F.log_softmax(prefix.logits[:, -1].float(), -1)  # (B, K) next-token distribution after the prefix
    edge[:, trie.top] = first[:, torch.tensor([trie.token[v] for v in trie.top], device=device)]
    if trie.inner:
        cache, T = prefix.past_key_values, embeds.shape[1]
        cache_token = sum(t.numel() * t.element_size() for t in _cache_tensors(cache)) // (B * T)
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        # a node's logits three times (the model's, a float32 copy, logsumexp's temporary), its keys and
        # values, its mask row; and once per chunk, the prefix cache its keys are appended to
        per_node = B * (3 * 4 * vocab + cache_token + 4 * (T + TRIE_CHUNK))
        size = min(TRIE_CHUNK, max(trie.depth_max, (memory - B * T * cache_token) // per_node))
        for chunk in trie.chunks(size):
            edge[:, chunk.children] = _score_chunk(lm, cache, chunk, mask, positions)
    return edge[:, torch.tensor(trie.paths(), device=device)].sum(-1)  # (B, C, L) -> (B, C)


@dataclass
class _Chunk:
    """Trie nodes for one forward (`tokens`, `depths`, `up`: each one's parent's index in the chunk, -1
    if the parent is outside it) and the edges it scores: node `children[i]`, token `child_tokens[i]`,
    read from the logits at the chunk's position `at[i]`."""

    tokens: list[int]
    depths: list[int]
    up: list[int]
    children: list[int]
    child_tokens: list[int]
    at: list[int]


class _Trie:
    """The candidates' token sequences as a trie. Node v is a distinct leading token sequence of some
    candidate: `token[v]` its last token, `parent[v]` the node one token shorter (-1: none), `depth[v]`
    its length. `inner` lists, depth first, the nodes that a longer candidate continues: only they run
    through the LM, since a node's own token is scored from its parent's logits."""

    def __init__(self, sequences: list[list[int]]):
        if not all(sequences):
            raise ValueError("a candidate answer tokenizes to no tokens")
        self.sequences, self.node, self.kids = sequences, {}, {}
        self.token, self.parent, self.depth = [], [], []
        # in sorted order the nodes are created depth first (a sequence sorts before its extensions)
        for seq in sorted(set(map(tuple, sequences))):
            for k in range(1, len(seq) + 1):
                if seq[:k] not in self.node:
                    up = self.node[seq[: k - 1]] if k > 1 else -1
                    self.node[seq[:k]] = v = len(self.token)
                    self.token.append(seq[k - 1])
                    self.parent.append(up)
                    self.depth.append(k)
                    self.kids.setdefault(up, []).append(v)
        self.top = self.kids.get(-1, [])
        self.inner = [v for v in range(len(self.token)) if v in self.kids]
        self.depth_max = max((self.depth[v] for v in self.inner), default=0)

    def paths(self) -> list[list[int]]:
        """Each candidate's nodes, its first token's first, right-padded with len(token) (the zero column)."""
        width, pad = max(map(len, self.sequences)), len(self.token)
        return [[self.node[tuple(s[:k])] for k in range(1, len(s) + 1)] + [pad] * (width - len(s))
                for s in self.sequences]

    def chunks(self, size: int):
        """Consecutive runs of `inner` of at most `size` nodes, each led by those ancestors of its first
        node that it lacks. Depth first, these are all the ancestors a run lacks (a node's ancestors
        precede it, and the nodes between an ancestor and it descend from that ancestor); they run
        again, at most depth_max - 1 nodes a chunk, and their edges are not scored twice."""
        start = 0
        while start < len(self.inner):
            lead, up = [], self.parent[self.inner[start]]
            while up >= 0:
                lead.insert(0, up)
                up = self.parent[up]
            run = self.inner[start : start + max(1, size - len(lead))]
            start += len(run)
            nodes = lead + run
            local = {v: i for i, v in enumerate(nodes)}
            edges = [(c, local[v]) for v in run for c in self.kids[v]]
            yield _Chunk([self.token[v] for v in nodes], [self.depth[v] for v in nodes],
                         [local.get(self.parent[v], -1) for v in nodes], [c for c, _ in edges],
                         [self.token[c] for c, _ in edges], [i for _, i in edges])


def _score_chunk(lm: LanguageModel, cache: Any, chunk: _Chunk, mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """One forward of a chunk of trie nodes, every prefix's row, after the prefix cache: the
    log-probabilities of the chunk's scored edges, (B, len(chunk.children)). A node attends to its
    prefix and, within the chunk, to its ancestors and itself (a 4D mask); its position is its prefix's
    last plus its depth."""
    B, n, device = mask.shape[0], len(chunk.tokens), mask.device
    up = torch.tensor(chunk.up, device=device)
    sees = torch.eye(n, dtype=torch.bool, device=device)  # sees[i, j]: node j is node i or an ancestor of it
    reach = up
    while bool((reach >= 0).any()):
        rows = (reach >= 0).nonzero().squeeze(1)
        sees[rows, reach[rows]] = True
        reach = torch.where(reach >= 0, up[reach.clamp(min=0)], reach)
    allowed = torch.cat([mask.bool()[:, None, None, :].expand(B, 1, n, -1), sees.expand(B, 1, n, n)], -1)
    dtype = lm.model.dtype  # an additive float mask: the eager and SDPA attentions both take it as it is
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    tokens = torch.tensor(chunk.tokens, device=device).expand(B, n)
    node_pos = positions[:, -1:] + torch.tensor(chunk.depths, device=device)
    logits = lm.model(input_ids=tokens, attention_mask=additive, position_ids=node_pos,
                      **with_cache(lm.model, _cache_view(cache))).logits.float()  # (B, n, K)
    at = torch.tensor(chunk.at, device=device)
    # log_softmax at the scored positions' chosen tokens only: logit - logsumexp (no (B, n, K) log-probs)
    return logits[:, at, torch.tensor(chunk.child_tokens, device=device)] - torch.logsumexp(logits, -1)[:, at]


def _token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of each target token: (R, n)."""
    return F.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _bytes_per_row(lm: LanguageModel, prefix_len: int, max_len: int, cache_per_token: int) -> int:
    """What one (prefix, candidate) row of a T5 chunk holds at its peak: its copy of the prefix's encoder
    states (`cache_per_token` bytes a position) twice, and its vocabulary logits three times (the
    model's, float32, log-softmax)."""
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


def _cache_view(cache: Any) -> Any:
    """A cache that starts as `cache` and then grows on its own: new layer objects over the same tensors.
    A forward appends to a dynamic cache by concatenation (new tensors), so `cache` is left as it is and
    nothing is copied up front."""
    out = copy.copy(cache)
    if hasattr(cache, "layers"):
        out.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        out.key_cache, out.value_cache = list(cache.key_cache), list(cache.value_cache)
    return out
