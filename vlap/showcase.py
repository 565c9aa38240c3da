"""What a user sees: `vlap search` for a text and `vlap caption` on a few test images, with every method's
bridge, as one markdown page (the README quotes it before and after training to convergence).

    python -m vlap.showcase [--data data] [--method-data vlap=data/curves/vlap ...] [--text "a blue circle" ...]
                            [--images 6] [--out results/showcase-default.md]

Each returned image is shown with its own reference caption, so a reader can tell a blue circle from a
green rectangle; the captions are decoded greedily (as `vlap caption` prints them) for the first `--images`
test images of the manifest. `--method-data m=ROOT` reads method m's bridge from another data root (the
bridges `vlap curves` leaves at their plateau).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import METHODS, load_config
from pipeline.errors import report_user_errors
from pipeline.io import write_text_atomic
from pipeline.manifest import read_manifest, resolve_image_root
from pipeline.paths import Dirs
from vlap.cli import best_scorer, load_bridge_for, read_image, search


def showcase(params: Path, data: Path, method_data: dict[str, Path], methods: list[str], texts: list[str], top: int,
             n_images: int, command: str) -> str:
    cfg = load_config(params)
    manifest = read_manifest(Dirs.under(data).prepared, "test")
    reference = {r.image_id: (r.captions[0] if r.captions else "–") for r in manifest.images}
    heldout = {" ".join(c.split()) for c in cfg.prepare.heldout}
    lines = ["# `vlap search` and `vlap caption`, every method", "", f"Command: `{command}`", ""]
    for text in texts:
        unseen = " (a combination the zero-shot split keeps out of training)" if text.removeprefix("a ") in heldout else ""
        lines += [f"## `vlap search \"{text}\" --top {top}`{unseen}", ""]
        for method in methods:
            root = Dirs.under(method_data.get(method, data))
            hits = search(cfg, method, root, text, top)
            lines += [f"{method} (bridge `{root.models / method}`, scorer {best_scorer(root, method)}):", "",
                      "| rank | test image | score | its reference caption |", "| ---: | --- | ---: | --- |"]
            lines += [f"| {k} | {image_id} | {score:.4f} | {reference.get(image_id, '–')} |"
                      for k, (image_id, score, _) in enumerate(hits, start=1)]
            lines.append("")
    images = [r for r in manifest.images if r.captions][:n_images]
    lines += ["## Captions of the first test images", "",
              "| test image | reference | " + " | ".join(methods) + " |", "| --- | --- |" + " --- |" * len(methods)]
    captions = {}
    folder = resolve_image_root(manifest.image_root, cfg.prepare)
    pictures = [read_image(folder / r.image_path) for r in images]
    for method in methods:
        bridge = load_bridge_for(cfg, method, method_data.get(method, data))
        captions[method] = [" ".join(c.split()) for c in bridge.caption(pictures, cfg.evaluate.caption.max_new_tokens)]
    for k, r in enumerate(images):
        lines.append(f"| {r.image_id} | {r.captions[0]} | " + " | ".join(captions[m][k] for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlap.showcase", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", type=Path)
    p.add_argument("--data", default="data", type=Path)
    p.add_argument("--method-data", action="append", default=[], metavar="METHOD=ROOT",
                   help="read this method's bridge from another data root (repeatable)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--text", nargs="+", default=["a blue circle", "a red rectangle"])
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="write the page here (default: print it)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    method_data = {m: Path(root) for m, _, root in (item.partition("=") for item in args.method_data)}

    def go() -> None:
        page = showcase(args.params, args.data, method_data, args.methods, args.text, args.top, args.images,
                        " ".join(["python -m vlap.showcase", *argv]))
        if args.out:
            write_text_atomic(args.out, page)
        else:
            print(page, end="")

    return report_user_errors(go)


if __name__ == "__main__":
    sys.exit(main())
