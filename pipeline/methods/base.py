"""What every method is: a params section with its learning rate and captioning weight, and an nn.Module
that turns a batch's bridged visual representations into its alignment loss terms.

The captioning loss every method shares is computed by the training step (pipeline/train.py), weighted
by `caption_weight`, and skipped when that weight is 0: such a method's steps never run the LLM.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from pipeline.distributed import Ranks
from pipeline.schema import NonNegative, OptionalPositive, section


@section
class MethodConfig:
    lr: OptionalPositive = None  # null: train.lr (tuning sets it)
    caption_weight: NonNegative = 1.0  # 0: no captioning loss, and no LLM pass in a training step


class Method(torch.nn.Module):
    """One method's alignment objective, built once per run from its params section, the word prototypes
    (text representations and the prior) and the world of ranks it trains in. Its parameters (if any) are
    trained with the bridge, without weight decay; its state goes into the resume checkpoint."""

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    summary: ClassVar[str] = ""
    weight_key: ClassVar[str | None] = None  # its alignment term's weight under methods.<name> (tuned with lr)
    temperature_key: ClassVar[str | None] = None  # an initial temperature `vlap tune --temperature` varies

    def __init__(self, config: MethodConfig, prototypes, ranks: Ranks):
        super().__init__()
        self.config, self.prototypes, self.ranks = config, prototypes, ranks

    @property
    def captions(self) -> bool:
        """Whether its loss has the captioning term (and its steps run the LLM)."""
        return self.config.caption_weight > 0

    def forward(self, z_v: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted alignment term added to the loss, the named terms to log); z_v: (b, D) float32,
        L2-normalised, this rank's part of the global batch. Every value is this rank's share: the shares
        of all ranks add up to the global batch's."""
        return z_v.new_zeros(()), {}

    def after_optimizer_step(self) -> None:
        """Keeps its parameters in range after each optimiser step (CLIP clamps its logit scale)."""
