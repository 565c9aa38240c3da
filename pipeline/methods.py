"""The methods: VLAP and its two baselines, each one object (the registry every command iterates).

A method is its name (also its params section, `methods.<name>`), its alignment term (added to the
captioning loss every method shares), the params key of that term's weight (what tuning varies
beside lr), and whether it learns a logit scale. Adding a method: its params section in
pipeline/config.py (MethodsConfig) and one `Method` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.distributed import Ranks
from pipeline.losses import LogitScale, assignment_prediction_loss, info_nce_loss

# (method settings, prototypes, z_v (b, D), captions, terms to record into, ranks, logit scale) -> weighted term
Alignment = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    alignment: Alignment
    weight_key: str | None = None  # the alignment term's weight under methods.<name> (tuned with lr)
    learns_logit_scale: bool = False  # a CLIP logit scale trained with the bridge (its settings' temperature)
    summary: str = ""


def vlap_alignment(mcfg, protos, z_v, captions, terms: dict, ranks: Ranks, logit_scale=None) -> torch.Tensor:
    """λ · L_AP: each modality predicts the other's optimal-transport assignment over the word prototypes."""
    ap = assignment_prediction_loss(z_v, protos.text_reps(captions), protos.prototypes, protos.prior,
                                    epsilon=mcfg.epsilon, n_iters=mcfg.sinkhorn_iters, tau=mcfg.tau,
                                    target=mcfg.target, ranks=ranks)
    terms.update(loss_ap=ap.total, loss_ap_visual=ap.visual_term, loss_ap_text=ap.text_term,
                 sinkhorn_marginal_error=z_v.new_tensor(ap.marginal_error / ranks.world))
    return mcfg.ap_weight * ap.total


def contrastive_alignment(mcfg, protos, z_v, captions, terms: dict, ranks: Ranks,
                          logit_scale: LogitScale | None = None) -> torch.Tensor:
    """nce_weight · InfoNCE(z_v, z_t) over the global batch, at CLIP's learnable (or a fixed) logit scale."""
    text_ids = torch.tensor([protos.text_index[c] for c in captions])
    scale = logit_scale() if logit_scale is not None else 1.0 / mcfg.temperature
    terms["loss_nce"] = info_nce_loss(z_v, protos.text_reps(captions), scale, text_ids, ranks)
    terms["logit_scale"] = torch.as_tensor(scale, dtype=z_v.dtype).detach() / ranks.world  # a share, like every term
    return mcfg.nce_weight * terms["loss_nce"]


def no_alignment(mcfg, protos, z_v, captions, terms: dict, ranks: Ranks, logit_scale=None) -> torch.Tensor:
    return z_v.new_zeros(())


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("vlap", vlap_alignment, weight_key="ap_weight", summary="captioning + λ · assignment prediction (OT)"),
    Method("limber", no_alignment, summary="captioning only (LiMBeR)"),
    Method("contrastive", contrastive_alignment, weight_key="nce_weight", learns_logit_scale=True,
           summary="captioning + InfoNCE (CLIP-style)"),
)}
PROPOSED = "vlap"  # the method every other is compared with
BASELINES = tuple(name for name in REGISTRY if name != PROPOSED)
