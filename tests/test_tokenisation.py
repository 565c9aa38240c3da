"""Prompt and caption are one text: the caption's tokens are those that follow the prompt's in
`prompt + " " + caption`, for the LLM families the pipeline loads (SmolLM2/Llama and OPT byte-level
BPE, T5 SentencePiece)."""
from __future__ import annotations

import pytest
import torch

from pipeline.lms import LanguageModel
from tests.tiny_models import tiny_opt_tokenizer, tiny_t5_tokenizer

CAPTIONS = ["a blue triangle", "a gray shape", "a teal circle"]


def tokenizer_only(tokenizer) -> LanguageModel:
    return LanguageModel("tokenizer", None, tokenizer, "", False, torch.device("cpu"))


@pytest.fixture(scope="module", params=["smollm2", "opt", "t5"])
def lm(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    return tokenizer_only(tiny_opt_tokenizer() if request.param == "opt" else tiny_t5_tokenizer())


@pytest.mark.parametrize("prompt", ["A picture of", "A picture of "])
def test_prompt_then_caption_decodes_to_the_joined_text(lm, prompt):
    prompt_ids = lm.prompt_ids(prompt).tolist()
    for caption, ids in zip(CAPTIONS, lm.caption_token_ids(CAPTIONS, prompt)):
        assert lm.tokenizer.decode(prompt_ids + ids) == "A picture of " + caption
        # the first word is read in its after-a-space form, as in running text, not as a text's first word
        joined = lm.tokenizer("A picture of " + caption, add_special_tokens=False)["input_ids"]
        assert prompt_ids + ids == joined


def test_caption_targets_end_with_eos_and_pad(lm):
    ids, mask = lm.tokenize_captions(CAPTIONS, 16, "A picture of")
    rows = lm.caption_token_ids(CAPTIONS, "A picture of")
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == row + [lm.tokenizer.eos_token_id]


def test_first_caption_word_differs_from_its_standalone_form(smollm2):
    """The bug this guards against: tokenised apart, "a" was fed in its no-space form after "of"."""
    alone = smollm2.tokenizer("a blue triangle", add_special_tokens=False)["input_ids"]
    after_prompt = smollm2.caption_token_ids(["a blue triangle"], "A picture of")[0]
    assert alone[0] != after_prompt[0] and alone[1:] == after_prompt[1:]
