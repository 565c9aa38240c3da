"""The `vlap` command: run the pipeline, or use a trained bridge on one image or one text.

    vlap run [--flow] [-- DVC_REPRO_ARGS]           # dvc repro (waits for other runs), or the Prefect flow
    vlap caption IMAGE... [--folder DIR]            # greedy captions, in batches: "path<TAB>caption" per image
    vlap ask IMAGE "what shape is in the image?"    # open-ended answer
    vlap ask IMAGE "what color is the shape?" --answers red,green,blue   # best of the given answers
    vlap search "a blue circle" [--top 5] [--split test] [--scorer auto]   # ranked by the method's best scorer
    vlap study [--seeds 0 1 2] [--steps 200]        # seeds x methods with confidence intervals (vlap/study.py)
    vlap curves [--max-steps 3000]                  # each method to its validation plateau (vlap/curves.py)
    vlap tune [--apply]                             # each method's lr and weight on the validation split (vlap/tune.py)
    vlap ablate [--factor KEY=V1,V2] [--set KEY=V]  # VLAP's settings one at a time as DVC experiments (vlap/ablate.py)
    vlap preset NAME                                # write a preset's values into params.yaml (vlap/params_file.py)
    vlap config                                     # print every param as resolved
    vlap push you/vlap-easyvqa [--study results/study-easyvqa] [--save-to DIR]   # the bridge + model card to the Hub

Reads  --params (default params.yaml: extract.encoder, evaluate.* devices, lengths and test images),
       the bridge <data>/models/<method>/, and for search the test features, manifest and prototypes
       under --data (default data). Writes nothing (study: its folder); prints the answer on stdout.
Bad input (unreadable image, missing bridge, unknown method) -> one line on stderr, exit code 2.
`vlap push` uploads <data>/models/<method>/ with a model card (README.md: encoder, LLM, training data and
budget, and the primary metrics: the bridge's own evaluation under <data>/metrics/, and a study's 95%
intervals with --study); the token is HF_TOKEN's or the saved login's; --save-to DIR writes that folder instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image

from pipeline.images import load_image
from pipeline.manifest import read_manifest
from pipeline.api import Bridge
from pipeline.bridge import visual_representation
from pipeline.config import METHODS, Config, load_config
from pipeline.device import resolve_device
from pipeline.lms import load_lm
from pipeline.paths import Dirs
from pipeline.prototypes import caption_representations
from pipeline.features import features_file
from pipeline.tasks.inputs import load_eval_inputs
from pipeline.tasks.retrieval import SCORERS, fit_on_training, scorer_similarities
from pipeline.errors import USER_ERRORS, ConfigError, DatasetError, MismatchError
from pipeline.hub import check_repo_id


log = logging.getLogger("vlap")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_image(path: Path) -> Image.Image:
    """The image as RGB, or a one-line DatasetError naming the file."""
    try:
        return load_image(path)
    except (OSError, ValueError) as err:  # PIL raises both; FileNotFoundError is an OSError too
        raise DatasetError(f"{path}: not a readable image ({getattr(err, 'strerror', None) or err})") from None


def load_bridge_for(cfg: Config, method: str, data_dir: Path) -> Bridge:
    """The method's trained bridge; its encoder is the one config.json records, loaded from params'
    extract.encoder where that names it, or where the record is only a name (its weights must be the bridge's)."""
    folder = Dirs.under(data_dir).models / method
    return Bridge.load(folder, resolve_device(cfg.evaluate.common.device), local_encoder=cfg.extract.encoder)


def best_scorer(dirs: Dirs, method: str) -> str:
    """The method's best inductive scorer: the highest mean of image->text and text->image R@1 in its
    retrieval evaluation (data/metrics/retrieval/<method>.json), else the highest image->text R@1 of its last
    validation point while training; cosine when there is neither."""
    path = dirs.metrics / "retrieval" / f"{method}.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    scored = {s: metrics[f"{s}_i2t_R@1"] + metrics[f"{s}_t2i_R@1"] for s in SCORERS
              if f"{s}_i2t_R@1" in metrics and f"{s}_t2i_R@1" in metrics}
    if not scored:  # no retrieval evaluation (a `vlap curves` run): the last validation point's image->text R@1
        path = dirs.metrics / "train" / method / "metrics.json"
        val = json.loads(path.read_text()).get("val", {}) if path.exists() else {}
        scored = {s: val[f"{s}_i2t_R@1"] for s in SCORERS if f"{s}_i2t_R@1" in val}
    return max(scored, key=scored.get) if scored else "cosine"


def search(cfg: Config, method: str, dirs: Dirs, text: str, top: int, split: str = "test", scorer: str = "auto"
           ) -> list[tuple[str, float, Path]]:
    """(image id, score, path) of the `top` cached `split` images closest to `text`, best first, under
    `scorer` (auto: the method's best, see best_scorer).

    Streams the split's tokens in blocks and keeps a running top-k: memory is bounded by the block."""
    scorer = best_scorer(dirs, method) if scorer == "auto" else scorer
    inputs = load_eval_inputs(cfg, method, dirs, need_lm=False, split=split, every_image=True)
    lm = load_lm(inputs.meta["llm"], inputs.device)
    z_t = torch.from_numpy(caption_representations(lm, [text], batch_size=1)).to(inputs.device)  # (1, D)
    fit = None
    if scorer != "cosine":  # fitted on training images and captions: a score never depends on the gallery
        fit = fit_on_training(inputs, features_file(dirs.features, "train"), read_manifest(dirs.prepared, "train"),
                              cfg.evaluate.retrieval, cfg.evaluate.common.batch_size)
    log.info("search: ranking by the %s scorer", scorer)
    block = cfg.evaluate.common.batch_size
    best_scores, best_rows = torch.empty(0, device=inputs.device), torch.empty(0, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(inputs.image_ids), block):
            z_v = visual_representation(inputs.bridged(slice(start, start + block)))  # (b, D)
            scores = scorer_similarities(z_v, z_t, inputs.protos, fit, (scorer,))[scorer][:, 0]  # (b,)
            best_scores = torch.cat([best_scores, scores])
            best_rows = torch.cat([best_rows, torch.arange(start, start + len(scores))])
            keep = best_scores.topk(min(top, len(best_scores))).indices
            best_scores, best_rows = best_scores[keep], best_rows[keep.cpu()]
    return [(inputs.image_ids[i], s, inputs.image_paths[inputs.image_ids[i]])
            for s, i in zip(best_scores.tolist(), best_rows.tolist())]


def image_files(images: list[Path], folder: Path | None) -> list[Path]:
    """The images named, then every image file in `folder` (sorted, not recursive)."""
    found = list(images)
    if folder is not None:
        if not folder.is_dir():
            raise DatasetError(f"--folder {folder}: not a folder")
        found += sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise DatasetError("caption: no image given (name image files and/or --folder DIR)")
    return found


# ---------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    if args.flow:
        from vlap import flow  # Prefect is imported only when the flow is asked for

        return flow.main(["--params", args.params or "params.yaml", "--data", args.data or "data"]
                         + (["--dask"] if args.dask else []))
    if args.params or args.data or args.dask:
        raise ConfigError("--params, --data and --dask apply to --flow (dvc repro reads params.yaml, writes data/)")
    from vlap.repro import repro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return repro(args.dvc_args)


def cmd_caption(args: argparse.Namespace) -> int:
    """One line per image: `path<TAB>caption`; an unreadable image is one error line, the others go on."""
    cfg, paths = load_config(args.params), image_files(args.images, args.folder)
    if len(paths) == 1:
        read_image(paths[0])  # a lone bad image fails before the models load
    bridge = load_bridge_for(cfg, args.method, args.data)
    batch_size, failed = args.batch_size or cfg.evaluate.common.batch_size, 0
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append((path, read_image(path)))
            except DatasetError as err:
                print(f"error: {err}", file=sys.stderr)
                failed += 1
        if batch:
            captions = bridge.caption([image for _, image in batch], cfg.evaluate.caption.max_new_tokens)
            for (path, _), text in zip(batch, captions):
                print(f"{path}\t{' '.join(text.split())}", flush=True)  # one line, whatever was decoded
    return 2 if failed else 0


def cmd_ask(args: argparse.Namespace) -> int:
    cfg, image = load_config(args.params), read_image(args.image)
    bridge = load_bridge_for(cfg, args.method, args.data)
    print(bridge.ask(image, args.question, args.answers, cfg.evaluate.vqa.max_new_tokens))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    for rank, (image_id, score, path) in enumerate(
            search(load_config(args.params), args.method, Dirs.under(args.data), args.text, args.top, args.split,
                   args.scorer),
            start=1):
        print(f"{rank}\t{image_id}\t{score:.4f}\t{path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """The bridge and its model card to the Hub (or, with --save-to, to a folder): prints the commit URL (the
    folder)."""
    repo_id, cfg, dirs = check_repo_id(args.repo_id), load_config(args.params), Dirs.under(args.data)
    bridge = Bridge.load(dirs.models / args.method, "cpu")  # no model is loaded: only the weights travel
    card = {"study": args.study, "metrics": None if args.no_metrics else dirs.metrics,
            "data": training_data(cfg, dirs, bridge)}
    if args.save_to:
        print(bridge.save_pretrained(args.save_to, repo_id=repo_id, **card))
    else:
        print(bridge.push_to_hub(repo_id, private=args.private, endpoint=args.endpoint, **card))
    return 0


def training_data(cfg: Config, dirs: Dirs, bridge: Bridge) -> dict:
    """params' data source and held-out pairs, when the data root's training features are the bridge's (else the
    params may describe data the bridge never saw: one line saying so)."""
    index = dirs.features / "index.json"
    trained_on = json.loads(index.read_text()).get("train", {}).get("key") if index.exists() else None
    if trained_on != bridge.config.get("features_key"):
        raise MismatchError(f"{dirs.models / bridge.method}: trained on other training features than {dirs.features} "
                            "holds (run dvc repro, or name the --data root it was trained in)")
    return {"source": cfg.prepare.source, "test_source": cfg.prepare.test_source, "heldout": list(cfg.prepare.heldout)}


def answer_list(text: str) -> list[str]:
    answers = [a.strip() for a in text.split(",") if a.strip()]
    if not answers:
        raise argparse.ArgumentTypeError("expected comma-separated answers, e.g. red,green,blue")
    return answers


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vlap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline: dvc repro (after any other `vlap run` on the repo, and "
                                     "waiting out other DVC runs' locks), or the Prefect flow with --flow")
    run.add_argument("dvc_args", nargs="*", metavar="-- DVC_REPRO_ARGS",
                     help="passed to dvc repro, after `--` (e.g. `vlap run -- train@vlap`)")
    run.add_argument("--flow", action="store_true", help="run the Prefect flow instead of dvc repro")
    run.add_argument("--dask", action="store_true", help="with --flow: tasks on Dask (needs prefect-dask)")
    run.add_argument("--params", help="with --flow: params file (default: params.yaml)")
    run.add_argument("--data", help="with --flow: root of the stage folders (default: data)")
    run.set_defaults(command_fn=cmd_run)

    sub.add_parser("study", help="seeds x methods at one budget on the cached features: mean and 95%% intervals, "
                                 "paired differences (vlap study --help)")

    sub.add_parser("curves", help="each method at a constant lr until its validation loss plateaus: curves and "
                                  "the steps each needed (vlap curves --help)")

    sub.add_parser("tune", help="every method's lr and alignment weight on the validation split, the same grid "
                                "for each (vlap tune --help)")

    sub.add_parser("preset", help="write a preset's values (the paper's settings) into params.yaml "
                                  "(vlap preset --help)")
    sub.add_parser("config", help="print every param as params.yaml resolves it")

    sub.add_parser("ablate", help="VLAP's settings one factor at a time, queued as DVC experiments: a table and "
                                  "plots (vlap ablate --help)")

    def model_command(name: str, summary: str, fn) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=summary)
        c.add_argument("--method", default="vlap", choices=METHODS, help="which trained bridge (default: vlap)")
        c.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        c.add_argument("--data", default="data", type=Path, help="root of the stage folders (default: data)")
        c.set_defaults(command_fn=fn)
        return c

    caption_cmd = model_command("caption", "caption images, in batches: one line per image", cmd_caption)
    caption_cmd.add_argument("images", type=Path, nargs="*", help="image files")
    caption_cmd.add_argument("--folder", type=Path, help="also every image file in this folder")
    caption_cmd.add_argument("--batch-size", type=positive_int,
                             help="images per batch (default: evaluate.common.batch_size)")
    ask = model_command("ask", "answer a question about an image", cmd_ask)
    ask.add_argument("image", type=Path)
    ask.add_argument("question")
    ask.add_argument("--answers", type=answer_list, help="comma-separated candidates: answer with the most likely")
    search_cmd = model_command("search", "rank the cached test images by a text", cmd_search)
    search_cmd.add_argument("text")
    search_cmd.add_argument("--top", type=positive_int, default=5, help="how many images to list (default: 5)")
    search_cmd.add_argument("--split", default="test", help="which cached split to search (default: test)")
    search_cmd.add_argument("--scorer", default="auto", choices=("auto",) + SCORERS,
                            help="how to rank (default auto: the method's best scorer in its retrieval evaluation)")
    push = model_command("push", "upload the bridge with a model card to the Hugging Face Hub", cmd_push)
    push.add_argument("repo_id", help="the Hub model repository, owner/name (created if needed)")
    push.add_argument("--study", type=Path,
                      help="a vlap study (study.json or its folder) at the bridge's setting: its 95%% intervals "
                           "on the card")
    push.add_argument("--no-metrics", action="store_true",
                      help="leave out the bridge's own evaluation (<data>/metrics/<task>/<method>.json)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--endpoint", help="another Hub (default: HF_ENDPOINT, else https://huggingface.co)")
    push.add_argument("--save-to", type=Path, metavar="DIR",
                      help="write the folder that would be uploaded (card included) to DIR; upload nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:  # its own parser (vlap/study.py)
        from vlap import study

        return study.main(argv[1:])
    if argv[:1] == ["curves"]:  # its own parser (vlap/curves.py)
        from vlap import curves

        return curves.main(argv[1:])
    if argv[:1] == ["tune"]:  # its own parser (vlap/tune.py)
        from vlap import tune

        return tune.main(argv[1:])
    if argv[:1] == ["ablate"]:  # its own parser (vlap/ablate.py)
        from vlap import ablate

        return ablate.main(argv[1:])
    if argv[:1] in (["preset"], ["config"]):  # vlap/params_file.py
        from vlap import params_file

        return (params_file.preset_main if argv[0] == "preset" else params_file.config_main)(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command != "run":  # `run` leaves logging to the flow (or to dvc); here stdout is the answer
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.command_fn(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
