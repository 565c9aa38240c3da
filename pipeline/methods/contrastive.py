"""The contrastive baseline: captioning + InfoNCE between z_v and the caption's text representation,
at CLIP's learnable logit scale."""
from __future__ import annotations

import torch

from pipeline.losses import LogitScale, info_nce_loss
from pipeline.methods.base import Method, MethodConfig
from pipeline.schema import Bool, NonNegative, Positive, section


@section
class ContrastiveConfig(MethodConfig):
    nce_weight: NonNegative = 0.1
    temperature: Positive = 0.01  # the initial one when learned (CLIP: 0.07)
    learn_temperature: Bool = True  # CLIP's learnable logit scale (init 1 / temperature, at most 100)


class Contrastive(Method):
    """nce_weight · InfoNCE(z_v, z_t) over the global batch; samples sharing a caption are positives of
    each other."""

    name = "contrastive"
    Config = ContrastiveConfig
    summary = "captioning + InfoNCE (CLIP-style)"
    weight_key = "nce_weight"
    temperature_key = "temperature"

    def __init__(self, config: ContrastiveConfig, prototypes, ranks):
        super().__init__(config, prototypes, ranks)
        self.logit_scale = LogitScale(config.temperature, config.learn_temperature)

    def forward(self, z_v: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        protos = self.prototypes
        text_ids = torch.tensor([protos.text_index[c] for c in captions])
        scale = self.logit_scale()
        loss = info_nce_loss(z_v, protos.text_reps(captions), scale, text_ids, self.ranks)
        # the scale is logged as a share too, so that shares add up over ranks like every term
        terms = {"loss_nce": loss, "logit_scale": scale.detach().to(z_v.dtype) / self.ranks.world}
        return self.config.nce_weight * loss, terms

    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_()


METHOD = Contrastive
