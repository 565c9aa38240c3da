"""Splits made from a source's own: the zero-shot split (held-out colour-shape combinations) and the
validation split carved out of train."""
from __future__ import annotations

import json

from pipeline.errors import ConfigError
from pipeline.manifest import ZERO_SHOT, ImageRow, Split


def labelled_attributes(images: list[ImageRow]) -> tuple[set[str], set[str]]:
    """(colours, shapes) the images are labelled with (easy-VQA labels both; other sources neither)."""
    labelled = [r.labels for r in images]
    return {a["color"] for a in labelled if "color" in a}, {a["shape"] for a in labelled if "shape" in a}


def zero_shot_unsupported(splits: list[Split]) -> str | None:
    """Why the data cannot hold the zero-shot split (None when it can): it needs colour and shape labels."""
    train = next((s for s in splits if s.name == "train"), None)
    colors, shapes = labelled_attributes(train.images if train else [])
    if not colors or not shapes:
        return "the training images carry no colour and shape labels (easy-VQA's); the zero-shot split is skipped"
    return None


def parse_heldout(heldout: tuple[str, ...], images: list[ImageRow]) -> set[tuple[str, str]]:
    """prepare.heldout entries "<colour> <shape>" -> {(colour, shape)}, checked against the training
    images' labels; every colour and every shape must stay in training with some other partner."""
    colors, shapes = labelled_attributes(images)
    pairs = set()
    for i, entry in enumerate(heldout):
        words = entry.split()
        if len(words) != 2 or words[0] not in colors or words[1] not in shapes:
            raise ConfigError(f"prepare.heldout[{i}]: expected '<colour> <shape>' with a colour of "
                              f"{', '.join(sorted(colors))} and a shape of {', '.join(sorted(shapes))}, got {entry!r}")
        pairs.add((words[0], words[1]))
    for value, kind, index in [(c, "colour", 0) for c in colors] + [(s, "shape", 1) for s in shapes]:
        partners = {p[1 - index] for p in pairs if p[index] == value}
        if len(partners) == len(shapes if index == 0 else colors):
            raise ConfigError(f"prepare.heldout: holds out every combination of the {kind} {value!r}; "
                              f"the zero-shot split needs every {kind} seen in training")
    return pairs


def may_be_heldout(attributes: dict, pairs: set[tuple[str, str]]) -> bool:
    """Whether an image could show a held-out combination: its known attributes match one."""
    return any(attributes.get("color", c) == c and attributes.get("shape", s) == s for c, s in pairs)


def hold_out_combinations(splits: list[Split], heldout: tuple[str, ...]) -> dict:
    """The zero-shot split: every training image that may show a held-out colour-shape combination
    leaves training (with its questions); each test image labelled with both attributes gets the
    attribute `zero_shot`: "unseen" (a held-out combination) or "seen". Returns the counts for the report."""
    by_name = {s.name: s for s in splits}
    pairs = parse_heldout(heldout, by_name["train"].images)
    train = by_name["train"]
    kept = [r for r in train.images if not may_be_heldout(r.labels, pairs)]
    ids = {r.image_id for r in kept}
    report = {"heldout": sorted(f"{c} {s}" for c, s in pairs), "train_images_removed": len(train.images) - len(kept)}
    train.images, train.questions = kept, [q for q in train.questions if q["image_id"] in ids]
    domains = {"seen": 0, "unseen": 0}
    for row in by_name.get("test", Split("test", "", [])).images:
        attributes = row.labels
        if {"color", "shape"} <= attributes.keys():
            domain = "unseen" if (attributes["color"], attributes["shape"]) in pairs else "seen"
            row.attributes = json.dumps(attributes | {ZERO_SHOT: domain}, sort_keys=True)
            domains[domain] += 1
    return report | {"test_domains": domains}


def carve_validation(splits: list[Split], fraction: float) -> list[Split]:
    """A validation split of about `fraction` of the training images (by content hash, independent of
    the test split's hash), with their questions; tuning scores on it, never on test."""
    train = next(s for s in splits if s.name == "train")
    chosen = {r.image_id for r in train.images if int(r.image_sha256[8:16], 16) / 16**8 < fraction}
    val = Split("val", train.image_root, [r for r in train.images if r.image_id in chosen],
                [q for q in train.questions if q["image_id"] in chosen])
    train.images = [r for r in train.images if r.image_id not in chosen]
    train.questions = [q for q in train.questions if q["image_id"] not in chosen]
    return sorted([s for s in splits if s.name != "val"] + [val], key=lambda s: s.name)
