"""The captioning loss equals transformers' own loss over the full sequence, for causal LMs and T5."""
from __future__ import annotations

import pytest
import torch

from pipeline.device import training_attention
from pipeline.losses import captioning_loss
from pipeline.lms import load_lm
from tests.tiny_models import save_tiny_opt, save_tiny_t5

CPU = torch.device("cpu")


def reference_causal_loss(lm, V, prompt_ids, caption_ids, caption_mask):
    """HF's loss with logits at every position and labels -100 outside the caption."""
    B = V.shape[0]
    prompt = lm.embed(prompt_ids).expand(B, -1, -1)
    inputs = torch.cat([V, prompt, lm.embed(caption_ids)], 1)
    mask = torch.cat([torch.ones(B, V.shape[1] + prompt.shape[1], dtype=torch.long), caption_mask], 1)
    labels = torch.cat([torch.full((B, V.shape[1] + prompt.shape[1]), -100), caption_ids.masked_fill(caption_mask == 0, -100)], 1)
    return lm.model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss


def test_smollm2_caption_positions_only_equals_full_loss(smollm2):
    torch.manual_seed(0)
    V = (0.1 * torch.randn(2, 5, 576)).requires_grad_()
    prompt_ids = smollm2.prompt_ids("A picture of")
    caption_ids, caption_mask = smollm2.tokenize_captions(["a blue circle", "a red shape that is long"], 16, "A picture of")
    assert caption_ids[0, caption_mask[0].sum() - 1] == smollm2.tokenizer.eos_token_id  # EOS appended
    ours = captioning_loss(smollm2, V, prompt_ids, caption_ids, caption_mask)
    ref = reference_causal_loss(smollm2, V, prompt_ids, caption_ids, caption_mask)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    ours.backward()
    assert V.grad.abs().sum() > 0


def test_eager_attention_for_cpu_bf16_training_gives_sdpas_loss_and_is_undone(smollm2):
    """CPU bf16 training runs the LLM's eager attention (`training_attention`): on a padded batch in
    float32 it gives SDPA's loss and input gradient (the same causal masking), and the model
    gets its own attention back after the block, since evaluations share it."""
    assert training_attention("bf16", CPU) == "eager"
    assert training_attention("fp32", CPU) is None and training_attention("bf16", torch.device("cuda")) is None
    torch.manual_seed(0)
    V = 0.1 * torch.randn(2, 5, 576)
    prompt_ids = smollm2.prompt_ids("A picture of")
    caption_ids, caption_mask = smollm2.tokenize_captions(["a blue circle", "a red shape that is long"], 16, "A picture of")
    assert caption_mask[0].sum() < caption_mask[1].sum()  # the first caption is padded

    def loss_and_grad():
        v = V.clone().requires_grad_()
        loss = captioning_loss(smollm2, v, prompt_ids, caption_ids, caption_mask)
        loss.backward()
        return loss.detach(), v.grad

    own = smollm2.model.config._attn_implementation
    assert own == "sdpa"
    sdpa_loss, sdpa_grad = loss_and_grad()
    with smollm2.attention(training_attention("bf16", CPU)):
        assert smollm2.model.config._attn_implementation == "eager"
        eager_loss, eager_grad = loss_and_grad()
    assert smollm2.model.config._attn_implementation == own
    torch.testing.assert_close(eager_loss, sdpa_loss, rtol=1e-5, atol=0)
    assert (eager_grad - sdpa_grad).norm() < 1e-4 * sdpa_grad.norm()  # float32 rounding of two kernels
    with pytest.raises(RuntimeError), smollm2.attention("eager"):
        raise RuntimeError("a failed step")
    assert smollm2.model.config._attn_implementation == own


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_tiny_hf_models_train_the_prefix(tmp_path, smollm2, kind):
    save = save_tiny_opt if kind == "opt" else save_tiny_t5
    lm = load_lm(f"hf:{save(tmp_path / kind, smollm2.tokenizer)}", CPU)
    V = torch.randn(2, 3, lm.hidden_size, requires_grad=True)
    prompt_ids = lm.prompt_ids("A picture of")
    caption_ids, caption_mask = lm.tokenize_captions(["a blue circle", "a triangle"], 8, "A picture of")
    loss = captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask)
    if kind == "opt":
        ref = reference_causal_loss(lm, V, prompt_ids, caption_ids, caption_mask)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert torch.isfinite(loss)
    loss.backward()
    assert V.grad.abs().sum() > 0


def test_t5_caption_is_the_decoder_target_and_text_states_come_from_the_encoder(tmp_path, smollm2):
    lm = load_lm(f"hf:{save_tiny_t5(tmp_path / 't5', smollm2.tokenizer)}", CPU)
    torch.manual_seed(0)
    V = torch.randn(2, 3, lm.hidden_size)
    prompt_ids = lm.prompt_ids("A picture of")
    caption_ids, caption_mask = lm.tokenize_captions(["a blue circle", "a triangle"], 8, "A picture of")
    # Built by hand: [V ; prompt] into the encoder; the decoder reads <start> + caption[:-1] and predicts caption.
    prefix = torch.cat([V, lm.embed(prompt_ids).expand(2, -1, -1)], 1)
    start = torch.full((2, 1), lm.model.config.decoder_start_token_id)
    decoder_ids = torch.cat([start, caption_ids[:, :-1]], 1)
    logits = lm.model(inputs_embeds=prefix, decoder_input_ids=decoder_ids).logits
    keep = caption_mask.bool()
    ref = torch.nn.functional.cross_entropy(logits[keep], caption_ids[keep])
    assert captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask).item() == pytest.approx(ref.item(), rel=1e-5)
    summed = captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask, reduction="sum")
    assert summed.item() == pytest.approx(ref.item() * keep.sum().item(), rel=1e-5)

    ids, mask = lm.tokenize(["a blue circle"])
    encoder = lm.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(lm.text_states(ids, mask), encoder)


@pytest.mark.parametrize("memory", [1, 1 << 30])  # one (prefix, candidate) row per chunk; all in one
def test_t5_ranks_answers_by_decoder_likelihood(tmp_path, smollm2, memory):
    from pipeline.generation import rank_candidates

    lm = load_lm(f"hf:{save_tiny_t5(tmp_path / 't5', smollm2.tokenizer)}", CPU)
    torch.manual_seed(1)
    embeds, mask = torch.randn(2, 4, lm.hidden_size), torch.ones(2, 4, dtype=torch.long)
    candidates = [" yes", " blue rectangle", " no"]
    scores = rank_candidates(lm, embeds, mask, candidates, memory=memory)
    for b in range(2):
        for c, text in enumerate(candidates):
            ids, _ = lm.tokenize([text])
            logits = lm.model(inputs_embeds=embeds[b : b + 1], attention_mask=mask[b : b + 1], labels=ids).logits
            expected = torch.log_softmax(logits[0], -1).gather(-1, ids[0][:, None]).sum()
            assert scores[b, c].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow  # compiles a forward and backward (~25 s on a cold kernel cache)
def test_compiled_body_gives_the_eager_loss_and_gradient(tmp_path, smollm2):
    """train.compile: the torch.compile'd body gives the eager loss and prefix gradient (float32 rounding of
    fused kernels), and the eager model serves outside the block."""
    lm = load_lm(f"hf:{save_tiny_opt(tmp_path / 'opt', smollm2.tokenizer)}", CPU)
    torch.manual_seed(0)
    V = torch.randn(2, 3, lm.hidden_size)
    prompt_ids = lm.prompt_ids("A picture of")

    def loss_and_grad(captions):
        prefix = V.clone().requires_grad_()
        loss = captioning_loss(lm, prefix, prompt_ids, *lm.tokenize_captions(captions, 8, "A picture of"))
        loss.backward()
        return loss.detach(), prefix.grad

    captions = ["a long green rectangle on the left", "a star"]
    eager_loss, eager_grad = loss_and_grad(captions)
    with lm.compiled(True):
        assert lm._use_compiled
        compiled_loss, compiled_grad = loss_and_grad(captions)
    assert not lm._use_compiled
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
    with lm.compiled(False):
        assert not lm._use_compiled
