"""The evaluation tasks, each one object (the registry the graph, summary, study and ablation iterate).

A task is its name (its stage `evaluate_<name>`, its metrics file `metrics/<name>/<method>.json` and
plot folder `plots/<name>/<method>/`), its headline metrics (all "higher is better"), where each
headline's chance level is in the metrics file, and its per-item scores (what the study bootstraps
over): metric -> {test item: score}, and metric -> {test item: domain} where items have one, read
from the file its stage marks as its items (`Out(..., items=True)`).
Adding a task: its stage module (stages/evaluate_<name>.py) and one `Task` here (docs/extending.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.manifest import read_manifest, report_group
from pipeline.tasks.caption_metrics import cider_per_image
from pipeline.tasks.retrieval_metrics import SCORERS

ItemScores = tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]


def read_applicable(path: Path):
    """A stage's per-item file, or None where the task was not applicable."""
    if not path.exists():
        return None
    value = json.loads(path.read_text())
    return None if isinstance(value, dict) and value.get("applicable") is False else value


@dataclass(frozen=True)
class Task:
    name: str
    headlines: tuple[str, ...]
    chance_key: Callable[[str], str | None]  # headline metric -> its chance level's key in the metrics file
    # (its per-item file, as its stage declares it: StageSpec.items_path; the prepared dir) -> scores, domains
    per_item: Callable[[Path, Path], ItemScores]
    primary: str = ""  # the one headline a claim about this task is read on (the study corrects these as a family)


def caption_items(path: Path, prepared: Path) -> ItemScores:
    captions = read_applicable(path)
    if not captions:
        return {}, {}
    refs = {i: r["references"] for i, r in captions.items()}
    scores = {"caption/CIDEr": cider_per_image(refs, {i: r["generated"] for i, r in captions.items()})}
    by_id = {r.image_id: report_group(r.labels) for r in read_manifest(prepared, "test").images}
    return scores, {"caption/CIDEr": {i: by_id[i] for i in captions if by_id.get(i)}}


def vqa_items(path: Path, prepared: Path) -> ItemScores:
    scores, domains = {}, {}
    for setting, records in (read_applicable(path) or {}).items():
        for mode in ("open", "closed"):
            key = f"vqa/{setting}_{mode}_accuracy"
            scores[key] = {r["question_id"]: 100.0 * r[f"{mode}_accuracy"] for r in records}
            domains[key] = {r["question_id"]: r["domain"] for r in records if r.get("domain")}
    return scores, domains


def retrieval_items(path: Path, prepared: Path) -> ItemScores:
    ranks = read_applicable(path)
    scores, domains = {}, {}
    for direction, keys in (("i2t", ranks["image_ids"]), ("t2i", ranks["texts"])) if ranks else ():
        item_domain = dict(zip(keys, ranks.get("domains", {}).get(direction, [None] * len(keys))))
        for scorer, by_dir in ranks["ranks"].items():
            key = f"retrieval/{scorer}_{direction}_R@1"
            scores[key] = {k: 100.0 * (r <= 1) for k, r in zip(keys, by_dir[direction])}
            domains[key] = {k: d for k, d in item_domain.items() if d}
    return scores, domains


def arithmetic_items(path: Path, prepared: Path) -> ItemScores:
    scores, domains = {}, {}
    for kind, rows in (read_applicable(path) or {}).items():
        key = f"arithmetic/{kind}_swap_top1"
        scores[key] = {f"{q['query']}:{q['a']}>{q['b']}": 100.0 * q["hit"] for q in rows}
        domains[key] = {f"{q['query']}:{q['a']}>{q['b']}": q["domain"] for q in rows if q.get("domain")}
    return scores, domains


def taxonomy_items(path: Path, prepared: Path) -> ItemScores:
    """Each image's paired − unpaired cosine; RSA and the centroid gap are whole-set statistics: one item each
    (a study's interval for them is over seeds only)."""
    items = read_applicable(path)
    if not items:
        return {}, {}
    key = "taxonomy/paired_minus_unpaired_cosine"
    scores = {key: items["paired_minus_unpaired_cosine"]}
    scores |= {f"taxonomy/{name}": {"all": items[name]} for name in ("rsa", "modality_gap") if name in items}
    by_id = {r.image_id: report_group(r.labels) for r in read_manifest(prepared, "test").images}
    return scores, {key: {i: by_id[i] for i in scores[key] if by_id.get(i)}}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("caption", ("CIDEr", "METEOR", "BLEU-1"),
         lambda metric: f"chance_{metric}" if metric in ("CIDEr", "BLEU-1") else None, caption_items, "CIDEr"),
    Task("vqa", ("0shot_open_accuracy", "0shot_closed_accuracy", "nshot_open_accuracy", "nshot_closed_accuracy"),
         lambda metric: "chance_accuracy", vqa_items, "0shot_open_accuracy"),
    Task("retrieval", tuple(f"{scorer}_{d}_R@1" for scorer in SCORERS for d in ("i2t", "t2i")),
         lambda metric: "chance_" + metric.split("_", 1)[1], retrieval_items,  # the same for every scorer
         "cosine_i2t_R@1"),  # the scorer nothing is fitted for
    Task("arithmetic", ("color_swap_top1", "shape_swap_top1", "word_swap_top1"),
         lambda metric: f"chance_{metric}", arithmetic_items, "word_swap_top1"),  # any captions have word swaps
    Task("taxonomy", ("rsa", "paired_minus_unpaired_cosine", "modality_gap"),
         lambda metric: f"chance_{metric}", taxonomy_items, "rsa"),
)}
HEADLINES = {name: list(task.headlines) for name, task in TASKS.items()}  # task -> its headline metric keys
PRIMARY = tuple(f"{name}/{task.primary}" for name, task in TASKS.items())  # each task's primary metric
