"""Model loaders: the packaged SmolLM2 and EfficientNet-Lite0, and hf: folders of tiny models."""
from __future__ import annotations

import pytest
import torch

from pipeline import data
from pipeline.config import ConfigError
from pipeline.encoders import WeightsNotFound, load_encoder
from pipeline.lms import load_lm
from tests.tiny_models import save_tiny_clip_vision, save_tiny_opt, save_tiny_t5, save_tiny_vit

CPU = torch.device("cpu")


def test_smollm2_embeddings_and_greedy_text(smollm2):
    assert tuple(smollm2.embedding_matrix.shape) == (49152, 576)
    assert smollm2.hidden_size == 576 and not smollm2.is_encoder_decoder
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    ids, mask = smollm2.tokenize(["The capital of France is"])
    out = smollm2.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    text = smollm2.tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in text


def test_lite0_tokens_shape_and_frozen(lite0, easyvqa_root):
    img = data.load_image(easyvqa_root / "data/test/images/0.png")
    tokens = lite0.encode([img, img])
    assert tokens.shape == (2, 49, 1280)
    assert torch.equal(tokens[0], tokens[1])
    assert not lite0.model.training and not any(p.requires_grad for p in lite0.model.parameters())


@pytest.mark.parametrize("save, n_tokens", [(save_tiny_clip_vision, 17), (save_tiny_vit, 17)])
def test_hf_vision_encoders_from_a_folder(tmp_path, easyvqa_root, save, n_tokens):
    folder = save(tmp_path / "enc")
    encoder = load_encoder(f"hf:{folder}", CPU)
    img = data.load_image(easyvqa_root / "data/test/images/0.png")
    tokens = encoder.encode([img, img])
    assert tokens.shape == (2, n_tokens, 32)  # 4x4 patches + CLS
    assert len(encoder.weights_sha256) == 64 and "image_processor" in encoder.preprocessing


def test_hf_causal_lm_from_a_folder(tmp_path, smollm2):
    folder = save_tiny_opt(tmp_path / "opt", smollm2.tokenizer)
    lm = load_lm(f"hf:{folder}", CPU)
    assert lm.model.config.model_type == "opt" and not lm.is_encoder_decoder
    assert tuple(lm.embedding_matrix.shape) == (len(smollm2.tokenizer), 16)
    ids, mask = lm.tokenize(["a blue circle", "a red triangle"])
    states = lm.text_states(ids, mask)
    assert states.shape == (2, ids.shape[1], 16) and torch.isfinite(states).all()


def test_hf_t5_from_a_folder_uses_the_encoder(tmp_path, smollm2):
    folder = save_tiny_t5(tmp_path / "t5", smollm2.tokenizer)
    lm = load_lm(f"hf:{folder}", CPU)
    assert lm.is_encoder_decoder
    ids, mask = lm.tokenize(["a blue circle"])
    expected = lm.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(lm.text_states(ids, mask), expected)


@pytest.mark.parametrize("loader, spec", [(load_lm, "hf:nobody/missing-model"), (load_encoder, "hf:nobody/missing")])
def test_missing_weights_fail_in_one_line(loader, spec):
    with pytest.raises(WeightsNotFound) as err:
        loader(spec, CPU)
    assert "weights not found on this machine" in str(err.value) and "\n" not in str(err.value)


def test_unknown_specs_are_rejected():
    with pytest.raises(ConfigError, match="extract.encoder: unknown encoder"):
        load_encoder("resnet-50", CPU)
    with pytest.raises(ConfigError, match="prototypes.llm: unknown language model"):
        load_lm("gpt-5", CPU)
