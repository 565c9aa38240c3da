"""Validation while training: every `train.validation.every` steps, the losses and retrieval of a fixed subset of
the val split (never test), logged to dvclive under `val/` beside the training curves.

- `val/loss_cap`: the captioning loss of each subset image's first caption (a token mean, as in training);
- `val/loss_ap` and `val/loss_nce`: VLAP's assignment prediction loss and the InfoNCE of z_v and z_t, for
  every method alike, at `train.validation`'s own settings: diagnostics, whether or not the method trains
  that term; the subset is one batch for both;
- `val/<scorer>_i2t_R@1`: image→text R@1 against the subset's distinct captions under each retrieval
  scorer (pipeline.tasks.retrieval), the fitted ones fitted on `train.validation.fit_images` training
  images through the bridge as it stands.

The subset is the first `train.validation.samples` val images with features and a caption, the same for every
method and every point of a run, so the points compare. Its tokens are read once and held: a bounded
`samples` x N x d_v in float16. Everything on the text side (z_t, the gallery, the fitted text columns) is
fixed while training, so it is computed once, when the set is loaded; a point bridges the images only. Its cost per point is timed and logged with the throughput.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.bridge import visual_representation
from pipeline.config import Config
from pipeline.features import FeatureCache, features_file
from pipeline.losses import assignment_prediction_loss, captioning_loss, info_nce_loss
from pipeline.manifest import manifest_splits, read_manifest
from pipeline.paths import Dirs
from pipeline.prototypes import Prototypes
from pipeline.tasks.inputs import select_test_images
from pipeline.tasks.retrieval import SCORERS, TrainingFit, fit_columns, scorer_similarities
from pipeline.tasks.retrieval_metrics import rank_of_first_relevant, relevance_from_texts


@dataclass
class ValidationSet:
    tokens: torch.Tensor  # (n, N, d_v) float16, the fixed val subset
    captions: list[str]  # (n,) each image's first caption: the captioning loss's target, the alignment's text
    z_t: torch.Tensor  # (n, D) the captions' cached text representations
    text_ids: torch.Tensor  # (n,) each caption's index in the gallery (InfoNCE's multi-positive ids)
    gallery: torch.Tensor  # (m, D) z_t of the subset's distinct captions (every reference)
    relevant: np.ndarray  # (n, m) image i has text j among its references
    # (f, 1, d_v) float32: each fit image's tokens averaged. The bridge is linear, so bridging the mean token
    # gives the mean of the bridged tokens, i.e. z_v exactly, at 1/N of the memory and the work.
    fit_mean_tokens: torch.Tensor
    fit_mean_t: torch.Tensor  # (D,) the fit captions' mean z_t (the centred scorer)
    fit_log_b_t: torch.Tensor  # (K,) their OT columns (the assignment scorer)


def load_validation_set(cfg: Config, dirs: Dirs, protos: Prototypes) -> ValidationSet | None:
    """The fixed subset, or None where there is nothing to validate on (`every` 0, no val split or no
    val image with features and a caption)."""
    vcfg = cfg.train.validation
    if not vcfg.every or "val" not in manifest_splits(dirs.prepared):
        return None
    val_path = features_file(dirs.features, "val")
    if not val_path.exists():
        return None
    manifest = read_manifest(dirs.prepared, "val")
    with FeatureCache(val_path) as cache:
        ids = select_test_images(manifest, cache, vcfg.samples)
        if not ids:
            return None
        tokens = torch.from_numpy(cache.tokens(ids))
    train = read_manifest(dirs.prepared, "train")
    fit_means = []
    with FeatureCache(features_file(dirs.features, "train")) as cache:
        fit_ids = select_test_images(train, cache, vcfg.fit_images)
        for i in range(0, len(fit_ids), 256):  # bounded reads: a block of images at a time
            fit_means.append(torch.from_numpy(cache.tokens(fit_ids[i:i + 256])).float().mean(1, keepdim=True))
    references, train_captions = manifest.captions_by_id, train.captions_by_id
    captions = [references[i][0] for i in ids]
    texts = list(dict.fromkeys(c for i in ids for c in references[i]))
    fit_z_t = protos.text_reps([c for i in fit_ids for c in train_captions[i]])
    return ValidationSet(tokens=tokens, captions=captions, z_t=protos.text_reps(captions),
                         text_ids=torch.tensor([texts.index(c) for c in captions]), gallery=protos.text_reps(texts),
                         relevant=relevance_from_texts([references[i] for i in ids], texts),
                         fit_mean_tokens=torch.cat(fit_means), fit_mean_t=fit_z_t.mean(0),
                         fit_log_b_t=fit_columns(fit_z_t, protos, vcfg.epsilon, vcfg.sinkhorn_iters))


@torch.no_grad()
def validate(cfg: Config, lm, bridge: torch.nn.Module, protos: Prototypes, val: ValidationSet,
             prompt_ids: torch.Tensor) -> dict[str, float]:
    """The val/ metrics of the bridge as it stands (see the module's docstring), and `seconds` it took."""
    t0, device = time.perf_counter(), lm.device
    vcfg, batch = cfg.train.validation, cfg.train.batch_size
    loss_sum, n_tokens, z_v = 0.0, 0, []
    for i in range(0, len(val.captions), batch):
        V = bridge(val.tokens[i:i + batch].to(device, torch.float32))
        caption_ids, mask = lm.tokenize_captions(val.captions[i:i + batch], cfg.train.max_caption_tokens,
                                                 cfg.train.prompt)
        loss_sum += captioning_loss(lm, V, prompt_ids, caption_ids, mask, "sum").item()
        n_tokens += int(mask.sum())
        z_v.append(visual_representation(V.float()))
    z_v, z_t = torch.cat(z_v), val.z_t.to(device)
    ap = assignment_prediction_loss(z_v, z_t, protos.prototypes, protos.prior, epsilon=vcfg.epsilon,
                                    n_iters=vcfg.sinkhorn_iters, tau=vcfg.tau)
    out = {"loss_cap": loss_sum / max(1, n_tokens), "loss_ap": ap.total.item(),
           "loss_nce": info_nce_loss(z_v, z_t, 1.0 / vcfg.nce_temperature, val.text_ids).item()}
    fit_z_v = visual_representation(bridge(val.fit_mean_tokens.to(device)).float())
    fit = TrainingFit(mean_v=fit_z_v.mean(0), mean_t=val.fit_mean_t.to(device),
                      log_b_v=fit_columns(fit_z_v, protos, vcfg.epsilon, vcfg.sinkhorn_iters),
                      log_b_t=val.fit_log_b_t.to(device), epsilon=vcfg.epsilon)
    for scorer, similarity in scorer_similarities(z_v, val.gallery.to(device), protos, fit, SCORERS).items():
        ranks = rank_of_first_relevant(similarity.float().cpu().numpy(), val.relevant)
        out[f"{scorer}_i2t_R@1"] = 100.0 * float((ranks <= 1).mean())
    return out | {"seconds": time.perf_counter() - t0}
