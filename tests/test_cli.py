"""The `vlap` command on real easy-VQA images with a briefly trained bridge, the real encoder and SmolLM2."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.api import Bridge
from pipeline.manifest import read_manifest
from vlap import cli
from vlap.params_file import as_dict
from pipeline.paths import Dirs
from pipeline.tasks.captioning import generate_captions
from pipeline.tasks.inputs import load_eval_inputs
from stages import train

pytestmark = pytest.mark.slow  # trains bridges for the commands

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "rectangle", "triangle")


@pytest.fixture(scope="module")
def bridge_data(tiny_pipeline, smollm2, tmp_path_factory):
    """A --data folder (the tiny pipeline's caches + a limber bridge trained 5 steps) and its --params file."""
    cfg, dirs = tiny_pipeline
    root = tmp_path_factory.mktemp("cli")
    dirs.sharing_inputs(root)
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=5, batch_size=4, checkpoint_every=100),
        evaluate=dataclasses.replace(cfg.evaluate, common=dataclasses.replace(cfg.evaluate.common, test_images=8)),
    )
    train.run(cfg, Dirs.under(root), "limber", lm=smollm2)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(as_dict(cfg)))
    return cfg, params, root


@pytest.fixture(scope="module")
def test_image(bridge_data, smollm2):
    """The first evaluated test image: (id, file path, the caption the evaluation generates from its cached tokens)."""
    cfg, _, root = bridge_data
    inputs = load_eval_inputs(cfg, "limber", Dirs.under(root), lm=smollm2)
    first = inputs.image_ids[:1]
    generated = generate_captions(dataclasses.replace(inputs, image_ids=first, rows=inputs.rows[:1]),
                                  inputs.meta["prompt"], 1, cfg.evaluate.caption.max_new_tokens)
    return first[0], inputs.image_paths[first[0]], generated[first[0]]


def vlap(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_image_prefix_matches_the_cached_tokens(bridge_data, test_image, lite0, smollm2):
    """An image file through `vlap` gives the bridge the tokens the feature cache holds for it."""
    cfg, _, root = bridge_data
    image_id, path, _ = test_image
    inputs = load_eval_inputs(cfg, "limber", Dirs.under(root), lm=smollm2)
    bridge = Bridge(inputs.bridge, inputs.meta, inputs.device, encoder=lite0, lm=smollm2)
    V = bridge.prefixes([cli.read_image(path)])[0]  # (N, D)
    assert torch.allclose(V, inputs.bridged([0])[0], atol=1e-2)


def test_caption_prints_the_evaluation_caption(bridge_data, test_image, capsys):
    _, params, root = bridge_data
    _, path, evaluated = test_image
    code, out, err = vlap(capsys, "caption", path, "--method", "limber", "--params", params, "--data", root)
    assert code == 0, err
    assert out == f"{path}\t{' '.join(evaluated.split())}\n"  # same prefix [V ; prompt] and decoding as evaluate_caption


def test_caption_many_images_in_batches(bridge_data, test_image, tmp_path, capsys):
    """Files and a folder, batches of 2, one line per image; an unreadable one is one error line, exit 2."""
    _, params, root = bridge_data
    _, path, evaluated = test_image
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG no")
    (folder / "notes.txt").write_text("not an image")
    code, out, err = vlap(capsys, "caption", path, "--folder", folder, "--batch-size", 2, "--method", "limber",
                          "--params", params, "--data", root)
    assert code == 2
    lines = [line.split("\t") for line in out.splitlines()]
    assert [Path(p) for p, _ in lines] == [path, folder / "0.png", folder / "1.png", folder / "2.png"]
    assert lines[0][1] == " ".join(evaluated.split())  # batched decoding gives the single-image caption
    (line,) = [e for e in err.splitlines() if e.startswith("error:")]  # (library warnings may precede it)
    assert line.startswith(f"error: {folder / 'broken.png'}: not a readable image")


def test_ask_closed_and_open(bridge_data, test_image, capsys):
    _, params, root = bridge_data
    _, path, _ = test_image
    common = ["--method", "limber", "--params", params, "--data", root]
    code, out, err = vlap(capsys, "ask", path, "what shape is in the image?", "--answers", ",".join(SHAPES), *common)
    assert code == 0, err
    assert out.strip() in SHAPES
    code, out, err = vlap(capsys, "ask", path, "what shape is in the image?", *common)  # open-ended: one line
    assert code == 0 and out.count("\n") == 1, err


def test_search_prints_ranked_test_images(bridge_data, capsys):
    cfg, params, root = bridge_data
    code, out, err = vlap(capsys, "search", "a blue circle", "--top", 3, "--method", "limber", "--params", params,
                          "--data", root)
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    cached = load_eval_inputs(cfg, "limber", Dirs.under(root), need_lm=False, every_image=True).image_ids
    assert len(cached) == 32  # every cached test image, not only the evaluated 8
    assert len({r[1] for r in rows}) == 3 and {r[1] for r in rows} <= set(cached)
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert all(Path(r[3]).is_file() for r in rows)
    code, out, err = vlap(capsys, "search", "a blue circle", "--top", 2, "--split", "train", "--method", "limber",
                          "--params", params, "--data", root)
    assert code == 0 and len(out.splitlines()) == 2, err
    # the assignment scorer, fitted on training images: Bhattacharyya coefficients in [0, 1], best first
    code, out, err = vlap(capsys, "search", "a blue circle", "--top", 4, "--scorer", "assignment", "--method",
                          "limber", "--params", params, "--data", root)
    assert code == 0, err
    scores = [float(line.split("\t")[2]) for line in out.splitlines()]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 + 1e-6 for s in scores)


def test_bad_method_and_missing_bridge_are_one_line(bridge_data, test_image, tmp_path, capsys):
    _, params, root = bridge_data
    _, path, _ = test_image
    code, _, err = vlap(capsys, "caption", path, "--method", "vlap", "--params", params, "--data", tmp_path)
    assert code == 2
    assert err.splitlines() == [
        f"error: {tmp_path}/models/vlap/model.safetensors: trained bridge not found (run the train stage first)"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["caption", str(path), "--method", "clip", "--data", str(root)])
    assert exit_.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1


def test_unreadable_image_exits_2_with_one_line(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really an image")
    script = Path(sys.executable).with_name("vlap")  # the console script pyproject declares
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vlap.cli"]
    proc = subprocess.run(command + ["caption", str(garbage), "--data", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: {garbage}: not a readable image")


def test_a_bridge_saved_with_its_card_loads_from_a_folder_and_from_the_hugging_face_cache(bridge_data, test_image,
                                                                                         tmp_path, monkeypatch, lite0,
                                                                                         smollm2):
    """save_pretrained writes the folder and a model card; from_pretrained reads a folder, or a Hub repo id from
    the local Hugging Face cache (its real layout, read offline by huggingface_hub); an unknown id is one line."""
    from pipeline.errors import MissingInputError

    _, _, root = bridge_data
    _, path, evaluated = test_image
    bridge = Bridge.load(Dirs.under(root).models / "limber", "cpu", encoder=lite0)
    folder = bridge.save_pretrained(tmp_path / "saved")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vlap-pipeline\n") and "pipeline_tag: image-to-text" in card
    assert "(limber)" in card and "Bridge.from_pretrained" in card and f"{bridge.config['steps']} steps" in card
    assert (folder / "model.safetensors").read_bytes() == (Dirs.under(root).models / "limber" /
                                                           "model.safetensors").read_bytes()
    # the Hugging Face cache's layout: models--<owner>--<name>/refs/main -> snapshots/<commit>/<files>
    cache, commit = tmp_path / "hf-cache", "0" * 40
    snapshot = cache / "models--someone--vlap-bridge" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (cache / "models--someone--vlap-bridge" / "refs").mkdir()
    (cache / "models--someone--vlap-bridge" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = Bridge.from_pretrained("someone/vlap-bridge", "cpu", cache_dir=cache, encoder=lite0)
    hub._lm = smollm2
    assert torch.equal(hub.module.proj.weight, bridge.module.proj.weight) and hub.config == bridge.config
    assert hub.caption([cli.read_image(path)])[0].strip() == evaluated.strip()
    with pytest.raises(MissingInputError, match="someone/other: not a bridge folder here, and not in the local"):
        Bridge.from_pretrained("someone/other", "cpu", cache_dir=cache)


def test_showcase_page_has_each_hit_with_its_reference_and_the_captions_vlap_prints(bridge_data, test_image, capsys,
                                                                                   tmp_path):
    from vlap import showcase

    cfg, params, root = bridge_data
    _, path, evaluated = test_image
    out = tmp_path / "page.md"
    assert showcase.main(["--params", str(params), "--data", str(root), "--methods", "limber", "--text",
                          "a blue circle", "--top", "3", "--images", "2", "--out", str(out)]) == 0
    page = out.read_text()
    code, searched, _ = vlap(capsys, "search", "a blue circle", "--top", 3, "--method", "limber", "--params", params,
                             "--data", root)
    reference = {r.image_id: r.captions[0] for r in read_manifest(Dirs.under(root).prepared, "test").images
                 if r.captions}
    for line in searched.splitlines():  # the same ranking `vlap search` prints, each with its own caption
        rank, image_id, score, _ = line.split("\t")
        assert f"| {rank} | {image_id} | {score} | {reference[image_id]} |" in page
    first = next(r for r in read_manifest(Dirs.under(root).prepared, "test").images if r.captions)
    code, printed, _ = vlap(capsys, "caption", path, "--method", "limber", "--params", params, "--data", root)
    assert Path(path).stem == first.image_id
    assert f"| {first.image_id} | {first.captions[0]} | {printed.split(chr(9))[1].strip()} |" in page
