"""Training losses: VLAP's assignment prediction loss, the InfoNCE baseline, and captioning."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.distributed import Ranks
from pipeline.ot import released_targets, sinkhorn


@dataclass(frozen=True)
class APLoss:
    """This rank's shares of the loss terms (the whole terms in one process); shares add up over ranks."""

    total: torch.Tensor  # ½ (visual_term + text_term); only visual_term carries gradient (to z_v)
    visual_term: torch.Tensor  # -mean_b Σ_k q_t log p_v: predict the text's assignment from the image
    text_term: torch.Tensor  # -mean_b Σ_k q_v log p_t: reported, no gradient (text side is frozen)
    marginal_error: float  # Sinkhorn column-marginal L1 error, mean over the visual and text problems


def assignment_prediction_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    prototypes: torch.Tensor,
    prior: torch.Tensor,
    *,
    epsilon: float,
    n_iters: int,
    tau: float,
    target: str = "transport",
    ranks: Ranks = Ranks(),
) -> APLoss:
    """Swapped assignment prediction (docs/method.md#the-objective).

    z_v, z_t: (b, D) L2-normalised, this rank's part of the global batch of B; prototypes: (K, D)
    L2-normalised word embeddings Ê; prior: (K,) mu. The OT problems couple the samples of a batch,
    so they are solved over the global batch, sharded: each rank keeps its own rows and the
    column updates sum over ranks (pipeline/ot.py); each rank then scores its own rows.
    """
    z_t, prototypes = z_t.detach(), prototypes.detach()  # frozen text reps and word prototypes
    s_v, s_t = z_v @ prototypes.T, z_t @ prototypes.T  # (b, K) S_v and S_t, this rank's rows
    # Both OT problems in one call; never below float32 (a half-precision OT loses tiny mu_k).
    ot_dtype = torch.promote_types(s_v.dtype, torch.float32)
    scores = torch.stack([s_v.detach(), s_t]).to(ot_dtype)
    if target == "released":  # the authors' per-sample target; its columns are not held to mu
        assignments = released_targets(scores, prior, epsilon, n_iters)
        column_sums = ranks.all_sum(assignments.sum(-2)) / (scores.shape[-2] * ranks.world)
        marginal_error = (column_sums - prior.to(ot_dtype)).abs().sum(-1)
    else:
        ot = sinkhorn(scores, prior, epsilon, n_iters, ranks=ranks)
        assignments, marginal_error = ot.assignments, ot.marginal_error
    q_v, q_t = assignments.to(s_v.dtype).unbind(0)  # (b, K) each, rows sum to 1, targets (no grad)
    log_p_v = F.log_softmax(s_v / tau, dim=-1)  # (b, K)
    log_p_t = F.log_softmax(s_t / tau, dim=-1)  # (b, K)
    batch = s_v.shape[0] * ranks.world
    visual_term = -(q_t * log_p_v).sum() / batch  # this rank's share of the batch mean
    text_term = -(q_v * log_p_t).sum(-1).mean() / ranks.world  # equal row counts: the same share
    return APLoss(
        total=0.5 * (visual_term + text_term),
        visual_term=visual_term,
        text_term=text_term,
        marginal_error=marginal_error.mean().item(),
    )


class LogitScale(torch.nn.Module):
    """CLIP's logit scale: exp(log_scale), initialised at 1 / temperature; learnable or fixed. As CLIP
    trains it, the parameter is clamped after every optimiser step so that the scale stays <= 100."""

    MAX_SCALE = 100.0

    def __init__(self, temperature: float, learnable: bool = True):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(max=math.log(self.MAX_SCALE))


def info_nce_loss(
    z_v: torch.Tensor, z_t: torch.Tensor, logit_scale: torch.Tensor | float, text_ids: torch.Tensor | None = None,
    ranks: Ranks = Ranks(),
) -> torch.Tensor:
    """Symmetric (CLIP-style) InfoNCE over the global batch; z_v, z_t: (b, D) L2-normalised, this rank's rows;
    logits are cosines times `logit_scale` (1 / temperature).

    Every rank computes the whole loss over the gathered batch and returns an equal share of it; the
    gather hands each rank the gradient of its own rows.
    """
    z_v, z_t = ranks.gather_with_grad(z_v), ranks.gather(z_t)  # (B, D) each
    logits = z_v @ z_t.T * logit_scale  # (B, B) image i vs text j
    B = logits.shape[0]
    # Samples sharing a caption (equal text_ids) are positives of each other, with a uniform target over them.
    if text_ids is None:
        positives = torch.eye(B, dtype=logits.dtype, device=logits.device)  # (B, B)
    else:
        text_ids = ranks.gather(text_ids.to(logits.device))
        positives = (text_ids[:, None] == text_ids[None, :]).to(logits.dtype)  # (B, B), symmetric
    targets = positives / positives.sum(-1, keepdim=True)  # (B, B) rows sum to 1
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    return loss / ranks.world


def captioning_loss(lm, V: torch.Tensor, prompt_ids: torch.Tensor, caption_ids: torch.Tensor,
                    caption_mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the caption given [V ; prompt] as input embeddings to the frozen LM.

    V: (B, N, D) bridged visual tokens; prompt_ids: (P,); caption_ids, caption_mask: (B, C) right-padded.
    Vocabulary logits are computed only at the positions that predict caption tokens. `reduction`
    "sum" gives the summed token losses (a share of a mean over several processes' tokens).
    """
    B, N, _ = V.shape
    prompt = lm.embed(prompt_ids).unsqueeze(0).expand(B, -1, -1)  # (B, P, D)
    prefix = torch.cat([V.to(prompt.dtype), prompt], dim=1)  # (B, N + P, D)
    prefix_mask = torch.ones(prefix.shape[:2], dtype=caption_mask.dtype, device=caption_mask.device)
    keep = caption_mask.bool()
    if lm.is_encoder_decoder:  # T5: the prefix goes to the encoder, the caption is the decoder's target
        labels = caption_ids.masked_fill(~keep, -100)  # the model shifts them right into decoder inputs
        logits = lm.model(inputs_embeds=prefix, attention_mask=prefix_mask, labels=labels, use_cache=False).logits
        return F.cross_entropy(logits[keep].float(), caption_ids[keep], reduction=reduction)
    inputs = torch.cat([prefix, lm.embed(caption_ids)], dim=1)  # (B, N + P + C, D)
    hidden = lm.body_states(inputs, torch.cat([prefix_mask, caption_mask], dim=1))  # (B, T, D)
    start = prefix.shape[1] - 1  # position t predicts token t + 1
    predicting = hidden[:, start : start + caption_ids.shape[1]]  # (B, C, D)
    logits = lm.output_embeddings(predicting[keep])  # (M, K) caption positions only
    return F.cross_entropy(logits.float(), caption_ids[keep], reduction=reduction)
