"""VLAP: captioning + λ · assignment prediction over the LLM's word prototypes (docs/method.md)."""
from __future__ import annotations

from typing import Literal

import torch

from pipeline.losses import assignment_prediction_loss
from pipeline.methods.base import Method, MethodConfig
from pipeline.schema import NonNegative, Positive, PositiveInt, section


@section
class VlapConfig(MethodConfig):
    ap_weight: NonNegative = 0.1  # lambda
    epsilon: Positive = 0.01  # Sinkhorn entropy weight
    sinkhorn_iters: PositiveInt = 3
    tau: Positive = 0.01  # softmax temperature of p_v, p_t
    # transport: the paper's OT problem (batch-coupled, word marginal mu); released: the authors' script's
    # per-sample target, each row ∝ exp(S/eps) · mu^sinkhorn_iters (docs/method.md#the-objective)
    target: Literal["transport", "released"] = "transport"


class Vlap(Method):
    """λ · L_AP: each modality predicts the other's optimal-transport assignment over the word prototypes;
    the transport problem couples the global batch, so it is solved over all ranks (pipeline/ot.py)."""

    name = "vlap"
    Config = VlapConfig
    summary = "captioning + λ · assignment prediction (OT)"
    weight_key = "ap_weight"

    def forward(self, z_v: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, protos = self.config, self.prototypes
        ap = assignment_prediction_loss(z_v, protos.text_reps(captions), protos.prototypes, protos.prior,
                                        epsilon=c.epsilon, n_iters=c.sinkhorn_iters, tau=c.tau, target=c.target,
                                        ranks=self.ranks)
        terms = {"loss_ap": ap.total, "loss_ap_visual": ap.visual_term, "loss_ap_text": ap.text_term,
                 "sinkhorn_marginal_error": z_v.new_tensor(ap.marginal_error / self.ranks.world)}
        return c.ap_weight * ap.total, terms


METHOD = Vlap
