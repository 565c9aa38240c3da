"""A trained bridge as a Python object: load it, caption images, answer questions.

    from pipeline.api import Bridge
    bridge = Bridge.load("data/models/vlap")             # model.safetensors + config.json
    bridge = Bridge.from_pretrained("user/vlap-bridge")  # a folder, or a Hub repo (bridge.push_to_hub(...))
    bridge.caption([Image.open("cat.png")])              # ["a cat on a sofa"]
    bridge.ask(Image.open("cat.png"), "what color is the cat?", answers=["black", "white"])

The bridge folder names the LLM and the encoder it was trained between; both are loaded on first use from
those ids (a Hub id from the local Hugging Face cache). An encoder that was a local folder is recorded by
name only (pipeline.model_ids.model_id): pass `encoder="hf:<folder>"`. The `vlap caption` and `vlap ask` commands
are this class; `vlap push` writes the model card and uploads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image

from pipeline.bridge import load_bridge, save_bridge
from pipeline.device import resolve_device
from pipeline.encoders import VisionEncoder, load_encoder
from pipeline.errors import ConfigError, MismatchError
from pipeline.hub import CARD, hub_folder, model_card, push_folder, read_metrics, read_study, unlocated_encoder
from pipeline.model_ids import locatable, model_id
from pipeline.io import write_text_atomic
from pipeline.weights import WeightsNotFound
from pipeline.generation import greedy_decode, left_pad, rank_candidates, text_embeds
from pipeline.lms import LanguageModel, load_lm
from pipeline.tasks.captioning import decode_captions
from pipeline.tasks.vqa import first_answer, query_text


class Bridge:
    """A trained bridge (torch module + config.json) and, loaded when first needed, its encoder and LLM."""

    def __init__(self, module: torch.nn.Module, config: dict, device: torch.device,
                 encoder: str | VisionEncoder | None = None, lm: LanguageModel | None = None,
                 local_encoder: str | None = None):
        """`encoder`: a spec to load or a loaded encoder (default: the id config.json records); `local_encoder`:
        where this machine keeps it (params' extract.encoder), used when it names the recorded encoder, when the
        recorded one is only a name, or when this machine lacks the recorded Hub id; `lm`: a loaded LLM
        (default: the config's, loaded on first use). Either encoder must have the weights the bridge was
        trained on."""
        self.module, self.config, self.device = module, config, device
        if isinstance(encoder, VisionEncoder):
            self.encoder_spec = encoder.spec
        else:
            self.encoder_spec = encoder or encoder_to_load(config["encoder"], local_encoder)
        self._encoder = self._checked(encoder) if isinstance(encoder, VisionEncoder) else None
        # a recorded Hub id this machine's cache lacks: this machine's own spec is tried next
        self._fallback = local_encoder if not isinstance(encoder, VisionEncoder) and not encoder else None
        self._lm = lm

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "auto", encoder: str | None = None,
             local_encoder: str | None = None) -> "Bridge":
        device = resolve_device(device) if isinstance(device, str) else device
        module, config = load_bridge(folder, device)
        return cls(module, config, device, encoder, local_encoder=local_encoder)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "auto", encoder: str | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None) -> "Bridge":
        """A bridge folder, or a Hugging Face Hub model repository holding one (`push_to_hub`), fetched into the
        local Hugging Face cache (with HF_HUB_OFFLINE=1, read from it)."""
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = hub_folder(str(name_or_path), revision, cache_dir)
        return cls.load(folder, device, encoder)

    def save_pretrained(self, folder: str | Path, *, study: str | Path | None = None,
                        metrics: str | Path | None = None, data: dict | None = None,
                        repo_id: str | None = None) -> Path:
        """The bridge folder (model.safetensors, config.json) with a model card (README.md).

        The card reports, when given: `study`, a `vlap study` report (study.json or its folder) of this bridge's
        method at its setting (checked: another setting is one line), each primary metric as mean and 95%
        interval; `metrics`, a metrics folder (data/metrics) holding this bridge's own evaluation
        (<task>/<method>.json); `data`, the training data ({"source", "heldout", "test_source"}: params'
        prepare); `repo_id`, the id its usage example loads."""
        card = {"study": read_study(study) if study is not None else None,
                "metrics": read_metrics(metrics, self.method) if metrics is not None else None,
                "data": data, "repo_id": repo_id}
        text = model_card(self.config, **card)  # first: a study of another setting writes nothing
        save_bridge(folder, self.module, self.config)
        write_text_atomic(Path(folder) / CARD, text)
        return Path(folder)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False, *,
                    study: str | Path | None = None, metrics: str | Path | None = None, data: dict | None = None,
                    endpoint: str | None = None) -> str:
        """Upload the bridge and its model card (save_pretrained's) to a Hub model repository (created if
        needed); its commit URL. `endpoint`: another Hub than HF_ENDPOINT / huggingface.co."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(tmp, study=study, metrics=metrics, data=data, repo_id=repo_id)
            return push_folder(folder, repo_id, token, private, endpoint=endpoint)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def encoder(self) -> VisionEncoder:
        if self._encoder is None:
            if not locatable(self.encoder_spec):
                raise ConfigError(f"the {self.method} bridge: {unlocated_encoder(self.config)}")
            try:
                self._encoder = self._checked(load_encoder(self.encoder_spec, self.device))
            except WeightsNotFound:
                if not self._fallback or self._fallback == self.encoder_spec:
                    raise
                self.encoder_spec = self._fallback
                self._encoder = self._checked(load_encoder(self.encoder_spec, self.device))
        return self._encoder

    def _checked(self, encoder: VisionEncoder) -> VisionEncoder:
        if encoder.weights_sha256 != self.config.get("encoder_weights_sha256"):
            raise MismatchError(f"encoder {encoder.spec} is not the encoder the {self.method} bridge was "
                                f"trained on ({self.config.get('encoder')})")
        return encoder

    @property
    def lm(self) -> LanguageModel:
        if self._lm is None:
            self._lm = load_lm(self.config["llm"], self.device)
        return self._lm

    @torch.inference_mode()
    def prefixes(self, images: list[Image.Image]) -> torch.Tensor:
        """V (B, N, D): the images' tokens, rounded to the feature store's dtype as in training, bridged."""
        dtype = getattr(torch, self.config.get("feature_dtype", "float16"))
        return self.module(self.encoder.encode(images).to(dtype).float())

    def caption(self, images: list[Image.Image], max_new_tokens: int = 12) -> list[str]:
        """Greedy captions after [V ; prompt], one per image (one batch: split large lists yourself)."""
        prompt = self.lm.embed(self.lm.prompt_ids(self.config["prompt"]))
        return decode_captions(self.lm, self.prefixes(images), prompt, max_new_tokens)

    def ask(self, image: Image.Image, question: str, answers: list[str] | None = None,
            max_new_tokens: int = 4) -> str:
        """[V] " Question: q Answer:" as the VQA evaluation asks: the most likely of `answers`, else decoded."""
        V = self.prefixes([image])[0]
        embeds, mask = left_pad([torch.cat([V, text_embeds(self.lm, query_text(question))])])  # (1, T, D)
        if answers:
            scores = rank_candidates(self.lm, embeds, mask, [f" {a}" for a in answers])  # (1, C) log-likelihoods
            return answers[int(scores[0].argmax())]
        return first_answer(greedy_decode(self.lm, embeds, mask, max_new_tokens)[0])


def encoder_to_load(recorded: str, local: str | None = None) -> str:
    """The spec a bridge's encoder loads from: `local` (this machine's spec for it) when it names the recorded
    encoder, or when the recorded one is only a name (a local folder's, or an older bridge's "hf"); else the
    recorded id. Loading checks the weights either way."""
    if local and (not locatable(recorded) or model_id(local) == recorded):
        return local
    return recorded
