"""The semantic-taxonomy claim and the modality gap, measured on the test split.

Taxonomy (RSA, representational similarity analysis). Classes are the values of the test images' labels
(easy-VQA: every colour and every shape; no other source labels its images yet); a class needs at least
`evaluate.taxonomy.min_images` evaluated images. Each class has
  - a visual representation: the mean z_v (the bridged tokens' normalised mean, as retrieval uses) of its
    images, normalised;
  - a word representation: the LLM's input embedding of the class word (" blue", its tokens' mean), the
    space the bridge maps into and the prototypes are rows of.
`rsa` is the Spearman correlation between the pairwise cosines of the visual class means and the pairwise
cosines of the class words, over every pair of classes (colours and shapes together); `rsa_<label>` over the
pairs within one label kind that has at least 4 classes. A bridge that keeps the LLM's taxonomy puts
similar words' images close: rsa near 1; chance is 0. Its interval resamples the images within each class
(`bootstrap` times); `rsa_p` is a permutation p-value (class words shuffled, `permutations` times).

Modality gap (on any captioned test split). z_v of each image against z_t of its first caption (the
cached text representations retrieval uses):
  - `modality_gap`: the distance between the centroids of z_v and z_t (0: the two clouds share a centre);
  - `paired_cosine`, `unpaired_cosine`: the mean cosine of an image with its own caption, and with the
    other images' captions; `paired_minus_unpaired_cosine` (per image, then averaged) is how much closer
    an image sits to its caption than to the rest.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from pipeline.manifest import DOMAIN, ZERO_SHOT
from pipeline.tasks.arithmetic import word_embedding
from pipeline.tasks.inputs import EvalInputs

NOT_CLASSES = {ZERO_SHOT, DOMAIN}  # attributes that group test items but are no class of the image
MIN_KIND_CLASSES = 4  # a per-kind RSA needs at least 6 pairs


def label_classes(attributes: dict[str, dict], image_ids: list[str], min_images: int
                  ) -> dict[tuple[str, str], list[int]]:
    """(label kind, class word) -> positions in image_ids of its images, classes with >= min_images images."""
    groups: dict[tuple[str, str], list[int]] = {}
    for k, image_id in enumerate(image_ids):
        for kind, value in attributes.get(image_id, {}).items():
            if kind not in NOT_CLASSES and isinstance(value, str) and value:
                groups.setdefault((kind, value), []).append(k)
    return {c: rows for c, rows in sorted(groups.items()) if len(rows) >= min_images}


def upper(similarity: np.ndarray) -> np.ndarray:
    return similarity[np.triu_indices(len(similarity), k=1)]


def class_means(z_v: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    means = np.stack([z_v[rows].mean(0) for rows in groups])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def rsa(visual: np.ndarray, words: np.ndarray) -> float:
    """Spearman correlation of the two (already normalised) sets' pairwise cosines."""
    return float(spearmanr(upper(visual @ visual.T), upper(words @ words.T)).statistic)


def taxonomy_metrics(z_v: np.ndarray, classes: dict[tuple[str, str], list[int]], words: np.ndarray, n_boot: int,
                     n_perm: int, seed: int) -> dict[str, float]:
    groups = list(classes.values())
    rng = np.random.default_rng(seed)
    means = class_means(z_v, groups)
    out = {"classes": len(groups), "pairs": len(groups) * (len(groups) - 1) // 2, "rsa": rsa(means, words)}
    boot = [rsa(class_means(z_v, [rng.choice(rows, len(rows)) for rows in groups]), words) for _ in range(n_boot)]
    out["rsa_low"], out["rsa_high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    null = [rsa(means, words[rng.permutation(len(words))]) for _ in range(n_perm)]
    out["rsa_p"] = float((1 + sum(v >= out["rsa"] for v in null)) / (1 + n_perm))
    for kind in sorted({k for k, _ in classes}):
        idx = [i for i, (k, _) in enumerate(classes) if k == kind]
        if len(idx) >= MIN_KIND_CLASSES:
            out[f"rsa_{kind}"] = rsa(means[idx], words[idx])
    return out


def gap_metrics(z_v: torch.Tensor, z_t: torch.Tensor) -> tuple[dict[str, float], np.ndarray]:
    """The modality-gap metrics and each image's paired − mean unpaired cosine."""
    cos = (z_v @ z_t.T).double()  # (n, n): image i against caption j
    n = len(cos)
    paired = cos.diagonal()
    unpaired = (cos.sum(1) - paired) / max(1, n - 1)
    per_image = (paired - unpaired).cpu().numpy()
    return {"modality_gap": float((z_v.mean(0) - z_t.mean(0)).norm()), "paired_cosine": float(paired.mean()),
            "unpaired_cosine": float(unpaired.mean()), "paired_minus_unpaired_cosine": float(per_image.mean()),
            "chance_paired_minus_unpaired_cosine": 0.0}, per_image


def evaluate_taxonomy(inputs: EvalInputs, min_images: int, n_boot: int, n_perm: int, seed: int, batch_size: int = 64
                      ) -> tuple[dict, dict]:
    """(metrics, per-item record: each image's paired − unpaired cosine, the classes and the whole-set rsa)."""
    z_v = inputs.z_v(batch_size)  # (n, D) normalised
    z_t = inputs.protos.text_reps([inputs.captions[i][0] for i in inputs.image_ids]).to(z_v.device)
    metrics, per_image = gap_metrics(z_v.float(), F.normalize(z_t.float(), dim=-1))
    record = {"paired_minus_unpaired_cosine": dict(zip(inputs.image_ids, per_image.tolist())),
              "modality_gap": metrics["modality_gap"]}
    classes = label_classes(inputs.attributes, inputs.image_ids, min_images)
    if len(classes) >= 3:  # fewer than 3 pairs leave no correlation to speak of
        words = F.normalize(torch.stack([word_embedding(inputs.lm, w).float() for _, w in classes]), dim=-1)
        metrics |= taxonomy_metrics(z_v.float().cpu().numpy().astype(np.float64), classes,
                                    words.cpu().numpy().astype(np.float64), n_boot, n_perm, seed)
        metrics["chance_rsa"] = 0.0
        record["classes"] = {f"{k}:{w}": len(rows) for (k, w), rows in classes.items()}
        record["rsa"] = metrics["rsa"]
    else:
        metrics["rsa_applicable"] = False
        metrics["rsa_reason"] = record["rsa_reason"] = (
            f"the test images have {len(classes)} label classes with at least {min_images} images each; RSA needs 3 "
            "(of the sources, only easy-VQA labels its images: colour and shape)")
    return metrics, record
