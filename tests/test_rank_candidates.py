"""Closed-vocabulary ranking over the candidates' token trie (`pipeline.generation.rank_candidates`)
equals the rankings it replaced (tests/reference_ranking.py), with the real SmolLM2-135M and a tiny OPT,
and does no forward that the trie does not need."""
from __future__ import annotations

import pytest
import torch

from pipeline.generation import RANKING_MEMORY, SharedPrefix, left_pad, prefill, rank_candidates, text_embeds
from pipeline.lms import load_lm
from reference_ranking import chunked_rank_candidates, unchunked_rank_candidates
from tiny_models import save_tiny_opt

PROMPTS = ["Question: what color is the sky? Answer:", "The shape is a",
           "Question: how many sides does a closed figure with straight edges have? Answer:"]
# 1, 2 and 3 tokens; " dark" leads " dark blue" and " dark turquoise" (shared first token, and a whole
# candidate that is the leading part of others), as " a" and " a rectangle" lead the longer " a rectangle ..."
CANDIDATES = [" blue", " teal", " circle", " dark", " dark blue", " dark turquoise", " yes", " 12", " magenta",
              " a", " a rectangle", " a rectangle with rounded corners", " a square", " no"]


def token_ids(lm, texts: list[str]) -> list[list[int]]:
    return [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def inner_nodes(ids: list[list[int]]) -> int:
    """Distinct leading token sequences that a longer candidate continues."""
    return len({tuple(s[:k]) for s in ids for k in range(1, len(s))})


class ForwardCounter:
    """The LM's forward calls and the token positions each runs (a forward pre-hook on the real model)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[tuple[int, int]] = []  # (rows, positions) of each call
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        self.calls.append((x.shape[0], x.shape[1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_the_candidates_cover_the_trie_cases(smollm2):
    ids = token_ids(smollm2, CANDIDATES)
    assert {len(s) for s in ids} >= {1, 2, 3}
    as_tuples = [tuple(s) for s in ids]
    assert any(a != b and b[: len(a)] == a for a in as_tuples for b in as_tuples)  # a candidate leads another
    assert any(len(a) > 1 and len(b) > 1 and a != b and a[0] == b[0] for a in as_tuples for b in as_tuples)


@pytest.fixture(scope="module")
def padded(smollm2):
    """The prompts left-padded (every row differently) and both references' scores on them."""
    seqs = [text_embeds(smollm2, p) for p in PROMPTS]
    assert len({len(s) for s in seqs}) == len(PROMPTS)
    embeds, mask = left_pad(seqs)
    return embeds, mask, [unchunked_rank_candidates(smollm2, embeds, mask, CANDIDATES),
                          chunked_rank_candidates(smollm2, embeds, mask, CANDIDATES)]


@pytest.mark.parametrize("memory", [1, 64 << 20, RANKING_MEMORY])  # a few nodes a chunk, several chunks, one
def test_trie_ranking_equals_the_references_on_left_padded_prefixes(smollm2, padded, memory):
    embeds, mask, references = padded
    scores = rank_candidates(smollm2, embeds, mask, CANDIDATES, memory=memory)
    for reference in references:
        assert torch.allclose(scores, reference, atol=1e-4), (scores - reference).abs().max()
        assert torch.equal(scores.argmax(-1), reference.argmax(-1))


def test_trie_ranking_after_a_shared_few_shot_prefix(smollm2):
    """As answer_questions ranks: the n-shot prefix cached once, each batch prefilled, then ranked from
    that cache; equal to the reference on the whole sequences, and the chunks leave the cache as it was."""
    shots = text_embeds(smollm2, "Question: what colour is a lemon? Answer: yellow\nQuestion: what colour is "
                                 "grass? Answer: green\n")
    queries = [text_embeds(smollm2, p) for p in PROMPTS[:2]]
    state = prefill(smollm2, queries, SharedPrefix(smollm2, shots))
    scores = rank_candidates(smollm2, state.embeds, state.mask, CANDIDATES, cache=state.cache)
    assert state.cache.get_seq_length() == state.embeds.shape[1]  # the prefix's last position, no candidate's
    embeds, mask = left_pad([torch.cat([shots, q]) for q in queries])
    expected = unchunked_rank_candidates(smollm2, embeds, mask, CANDIDATES)
    assert torch.allclose(scores, expected, atol=1e-4), (scores - expected).abs().max()


def test_one_token_candidates_need_no_forward_and_shared_tokens_run_once(smollm2):
    embeds, mask = left_pad([text_embeds(smollm2, p) for p in PROMPTS])
    single = [c for c, s in zip(CANDIDATES, token_ids(smollm2, CANDIDATES)) if len(s) == 1]
    assert len(single) >= 4
    with ForwardCounter(smollm2.model) as counter:
        rank_candidates(smollm2, embeds, mask, single)
    assert counter.calls == [(3, embeds.shape[1])]  # the prefixes only
    with ForwardCounter(smollm2.model) as counter:
        rank_candidates(smollm2, embeds, mask, CANDIDATES)
    prefix_call, *trie_calls = counter.calls
    assert prefix_call == (3, embeds.shape[1]) and len(trie_calls) == 1  # one chunk holds this trie
    # each inner trie node once, for all prefixes together; a candidate's last token never runs
    ids = token_ids(smollm2, CANDIDATES)
    assert trie_calls[0] == (3, inner_nodes(ids))
    assert inner_nodes(ids) < sum(len(s) - 1 for s in ids)  # sharing saved positions


@pytest.mark.parametrize("memory", [1, RANKING_MEMORY])
def test_trie_ranking_on_opt(tmp_path, smollm2, memory):
    lm = load_lm(f"hf:{save_tiny_opt(tmp_path / 'opt', smollm2.tokenizer)}", torch.device("cpu"))
    torch.manual_seed(0)
    embeds = torch.randn(3, 6, lm.hidden_size)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = mask[2, :4] = 0  # left padding of different widths
    scores = rank_candidates(lm, embeds, mask, CANDIDATES, memory=memory)
    expected = unchunked_rank_candidates(lm, embeds, mask, CANDIDATES)
    assert torch.allclose(scores, expected, atol=1e-4), (scores - expected).abs().max()
