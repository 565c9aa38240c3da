"""What every evaluation reads: the bridge, the cached test features, the prototypes, the LLM.

Checks that they belong together: the test cache must come from the encoder the
bridge was trained on, and the prototypes from the LLM it feeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.manifest import Manifest, read_manifest, resolve_image_root
from pipeline.bridge import load_bridge, visual_representation
from pipeline.features import FeatureCache, TokenReader, features_file
from pipeline.errors import DatasetError, MismatchError
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.lms import LanguageModel, load_lm
from pipeline.paths import Dirs
from pipeline.prototypes import Prototypes, check_prototypes_match, load_prototypes, prototypes_file


@dataclass
class EvalInputs:
    method: str
    bridge: torch.nn.Module
    meta: dict  # the bridge's saved config (prompt, encoder, llm, ...)
    lm: LanguageModel | None
    protos: Prototypes
    image_ids: list[str]  # evaluated test images, in manifest order
    features_path: Path  # the test split's cache file; tokens are read in blocks, never all at once
    rows: np.ndarray  # (n,) cache row of each evaluated image
    captions: dict[str, list[str]]  # image id -> reference captions
    attributes: dict[str, dict]  # image id -> {"color": ..., "shape": ...} where known
    image_paths: dict[str, Path]  # image id -> file, for example pages
    device: torch.device
    reader: TokenReader | None = field(default=None, repr=False)  # opened on first read

    def tokens(self, rows: slice | list[int]) -> torch.Tensor:
        """(b, N, d_v) float16 cached tokens of the given evaluated images (positions in image_ids)."""
        if self.reader is None:
            self.reader = TokenReader(self.features_path)
        return torch.from_numpy(self.reader.read_rows(self.rows[rows]))

    @torch.inference_mode()
    def bridged(self, rows: slice | list[int]) -> torch.Tensor:
        """V = bridge(tokens) for the given evaluated images: (b, N, D)."""
        return self.bridge(self.tokens(rows).to(self.device, torch.float32))

    @torch.inference_mode()
    def z_v(self, batch_size: int = 64) -> torch.Tensor:
        """(n, D) L2-normalised visual representations of all evaluated images."""
        return torch.cat([visual_representation(self.bridged(slice(i, i + batch_size)))
                          for i in range(0, len(self.image_ids), batch_size)])


def select_test_images(manifest: Manifest, cache: FeatureCache, limit: int, need_captions: bool = True,
                       only: set[str] | None = None) -> list[str]:
    """The first `limit` (0: all) images with features, and with captions unless told otherwise,
    among `only` when given."""
    ids = [r.image_id for r in manifest.images
           if (r.captions or not need_captions) and (only is None or r.image_id in only)
           and r.image_id in cache.index]
    return ids[:limit] if limit else ids


def load_eval_inputs(cfg: Config, method: str, dirs: Dirs, lm: LanguageModel | None = None,
                     need_lm: bool = True, split: str = "test", every_image: bool = False,
                     only: set[str] | None = None) -> EvalInputs:
    """The evaluation's inputs on `split`: its first `evaluate.common.test_images` images with captions
    and features; with `only`, the first of those images with features, captions or not (VQA: the
    images that have questions, VQAv2's have no captions); with `every_image` all its images with
    features (search)."""
    device = resolve_device(cfg.evaluate.common.device)
    bridge, meta = load_bridge(Path(dirs.models) / method, device)
    manifest = read_manifest(dirs.prepared, split)
    with FeatureCache(features_file(dirs.features, split)) as cache:
        if cache.attrs.get("encoder_weights_sha256") != meta.get("encoder_weights_sha256"):
            raise MismatchError(f"{cache.path}: {split} features come from another encoder than the {method} bridge "
                                f"was trained on ({meta.get('encoder')}); re-run extract and train")
        if every_image:
            ids = select_test_images(manifest, cache, 0, need_captions=False)
        else:
            ids = select_test_images(manifest, cache, cfg.evaluate.common.test_images, need_captions=only is None,
                                     only=only)
        if not ids:
            wanted = "a caption" if only is None else "questions"
            raise DatasetError(f"{cache.path}: no {split} image has both features and {wanted}")
        rows, d_vision = cache.rows(ids), int(cache.file["tokens"].shape[-1])
    if d_vision != meta["d_vision"]:
        raise MismatchError(f"{split} features have d_v = {d_vision}, the {method} bridge expects {meta['d_vision']}")
    if need_lm and lm is None:
        lm = load_lm(meta["llm"], device)
    protos = load_prototypes(prototypes_file(dirs.prototypes), device)
    if lm is not None:
        check_prototypes_match(protos, lm)
    root = resolve_image_root(manifest.image_root, cfg.prepare)
    by_id = {r.image_id: r for r in manifest.images}
    return EvalInputs(
        method=method, bridge=bridge, meta=meta, lm=lm, protos=protos, image_ids=ids, features_path=cache.path, rows=rows,
        captions={i: by_id[i].captions for i in ids},
        attributes={i: by_id[i].labels for i in ids},
        image_paths={i: root / by_id[i].image_path for i in ids}, device=device,
    )
