"""Captioning scores through pycocoevalcap, and a self-contained HTML page of examples.

Scoring follows the COCO caption evaluation: PTB-tokenise (lower-case, punctuation
dropped) references and predictions, then BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D).
Scores are on pycocoevalcap's own scale (BLEU/METEOR/ROUGE-L in [0, 1], CIDEr ~[0, 10]).
SPICE is left out on purpose: it downloads Stanford CoreNLP models at first use.
"""

from __future__ import annotations

import atexit
import base64
import html
import mimetypes
import os
import re
import threading
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from pipeline.images import read_image_bytes
from pipeline.io import atomic_path


def caption_scores(
    references: dict[str, list[str]], predictions: dict[str, str]
) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L, CIDEr of one prediction per id.

    references: id -> all reference captions of that image; predictions: id -> caption.
    CIDEr's IDF is computed over these references, so scores depend on the whole set.
    """
    if set(references) != set(predictions):
        only_ref = sorted(set(references) - set(predictions))[:3]
        only_pred = sorted(set(predictions) - set(references))[:3]
        raise ValueError(
            f"reference and prediction ids differ: only in references {only_ref}, "
            f"only in predictions {only_pred} (first 3 shown)"
        )
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"id {empty[0]!r} has no reference caption")

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = meteor_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)

    scores = {f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)}
    scores.update({"METEOR": meteor, "ROUGE-L": rouge, "CIDEr": cider})
    return {k: float(v) for k, v in scores.items()}


# One METEOR JVM per process: starting one takes seconds (it loads a paraphrase table), so a process that
# scores captions several times (a flow, a study, a tuning grid) starts it once, and a captioning stage
# starts it before generating, so that it loads meanwhile.
_meteor: Meteor | None = None
_meteor_pid = 0  # the process that started it (a forked child starts its own: the pipes are the parent's)
_meteor_lock = threading.RLock()


def start_meteor() -> None:
    """Start this process's METEOR JVM unless it is running (returns at once; it loads in the background)."""
    global _meteor, _meteor_pid
    with _meteor_lock:
        if _meteor is None or _meteor_pid != os.getpid() or _meteor.meteor_p.poll() is not None:
            _meteor, _meteor_pid = Meteor(), os.getpid()


def meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR of PTB-tokenised references `gts` and predictions `res`, on this process's JVM."""
    with _meteor_lock:
        start_meteor()
        try:
            return _meteor.compute_score(gts, res)[0]
        except BaseException:  # the JVM is mid-exchange: never reuse it
            stop_meteor()
            raise


@atexit.register
def stop_meteor() -> None:
    """Stop the JVM. Meteor.__del__ waits on a lock that a failed compute_score leaves held, which would
    hang at garbage collection: the lock is released here."""
    global _meteor
    with _meteor_lock:
        if _meteor is not None and _meteor_pid == os.getpid():
            _meteor.meteor_p.kill()
            _meteor.meteor_p.wait()
            if _meteor.lock.locked():
                _meteor.lock.release()
            _meteor = None


def domain_key(domain: str) -> str:
    """A metric-key part for a domain: "in-domain" -> "in", "near-domain" -> "near"."""
    return re.sub(r"[^0-9a-z]+", "_", domain.lower().removesuffix("-domain")).strip("_")


def cider_by_domain(references: dict[str, list[str]], predictions: dict[str, str],
                    domains: dict[str, str]) -> dict[str, float]:
    """CIDEr of each domain's images on their own, as NoCaps reports in-, near- and out-domain scores
    (each subset is scored separately, so its IDF comes from that subset's references), and over all
    images: keys CIDEr_<domain key> and CIDEr_overall. Images without a domain count in overall only."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    scores = {"CIDEr_overall": Cider().compute_score(gts, res)[0]}
    for domain in sorted(set(domains.values())):
        ids = [k for k in references if domains.get(k) == domain]
        scores[f"CIDEr_{domain_key(domain)}"] = Cider().compute_score({k: gts[k] for k in ids},
                                                                      {k: res[k] for k in ids})[0]
    return {k: float(v) for k, v in scores.items()}


def _image_data_uri(row: dict) -> str:
    # Embedding the bytes keeps the page working after it is moved or shared.
    if "image_b64" in row:
        return f"data:image/png;base64,{row['image_b64']}"
    path = Path(row["image_path"])
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(read_image_bytes(path)).decode('ascii')}"


def _row_html(row: dict) -> str:
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
    label = f"<h3>{html.escape(row['label'])}</h3>" if "label" in row else ""
    return (
        f'<div class="ex">{label}<img src="{_image_data_uri(row)}" alt="example image">'
        f'<p><b>generated:</b> {html.escape(row["generated"])}</p>'
        f"<p><b>references:</b></p><ul>{refs}</ul></div>"
    )


def write_examples_html(path: str | os.PathLike, rows: list[dict], title: str) -> Path:
    """Write a self-contained HTML page of examples; returns the path.

    Each row: `image_path` (any image file) or `image_b64` (base64 PNG bytes),
    `generated` (str), `references` (list[str]), optional `label` (str heading).
    Written atomically (pipeline.io.atomic_path), so a reader (or an interrupted run) never sees a
    half-written page.
    """
    path = Path(path)
    body = "\n".join(_row_html(r) for r in rows)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif} .ex{display:inline-block;vertical-align:top;"
        "width:260px;margin:8px} .ex img{width:256px;image-rendering:pixelated}"
        f"</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def cider_per_image(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """CIDEr(-D) of each image's prediction (PTB-tokenised, IDF over all these references): the corpus
    CIDEr is their mean, so a bootstrap over images can resample them."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    _, scores = Cider().compute_score(gts, res)
    return {k: float(v) for k, v in zip(gts, scores)}


def chance_scores(references: dict[str, list[str]], train_manifest, seed: int) -> dict[str, float]:
    """`chance_CIDEr`, `chance_BLEU-1`: each test image given a training caption drawn at random (seeded),
    the level a bridge that ignores the image would reach by sampling the caption distribution."""
    import random

    pool = [c for r in train_manifest.images for c in r.captions]
    if not pool:
        return {}
    rng = random.Random(seed)
    drawn = {k: rng.choice(pool) for k in sorted(references)}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": drawn[k]}] for k in references})
    bleu, _ = Bleu(1).compute_score(gts, res, verbose=0)
    return {"chance_CIDEr": float(Cider().compute_score(gts, res)[0]), "chance_BLEU-1": float(bleu[0])}
