"""Prepare: easy-VQA captions from questions, folder sources, portable manifests."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from pipeline.errors import DatasetError
from pipeline.images import load_image
from pipeline.manifest import read_manifest, read_questions, resolve_image_root
from pipeline.paths import package_dir
from pipeline.sources import folder as folder_source, karpathy
from pipeline.sources.easyvqa import COLORS, SHAPES, attributes_of, caption_of
from pipeline.sources.splits import carve_validation, hold_out_combinations, may_be_heldout
from pipeline.config import Config, PrepareConfig, parse_config
from pipeline.paths import Dirs
from shard_writer import png_bytes
from stages import prepare


def test_easyvqa_captions_derived_from_questions(easyvqa_splits):
    splits, report = easyvqa_splits
    train = splits["train"]
    assert report["train"]["images"] == 4000 and report["test"]["images"] == 1000
    assert report["train"]["questions"] == 38575 and report["test"]["questions"] == 9673
    # about 89% of images resolve both colour and shape (docs/method.md, easy-VQA captions)
    assert 0.88 < report["train"]["both"] / 4000 < 0.91
    assert sum(report["train"][k] for k in ("both", "color_only", "shape_only", "neither", "no_questions")) == 4000
    first = train.images[0]
    assert first.captions == ["a blue rectangle"]  # image 0: "what is the blue shape?" -> rectangle
    full = {c for r in train.images for c in r.captions if len(c.split()) == 3 and not c.endswith("shape")}
    assert len(full) == 24  # 8 colours x 3 shapes


def test_attributes_from_yes_no_questions():
    qs = [("is there not a red shape?", "no"), ("does the image contain a circle?", "no"),
          ("is no rectangle present?", "yes")]
    assert attributes_of(qs) == {"color": "red", "shape": "triangle"}
    assert caption_of({"color": "red"}) == "a red shape"
    assert caption_of({"shape": "circle"}) == "a circle"


def test_manifests_are_byte_identical_and_portable(tmp_path):
    cfg = Config()
    prepare.run(cfg, Dirs.under(tmp_path / "a"))
    prepare.run(cfg, Dirs.under(tmp_path / "b"))
    for name in ("train.parquet", "test.parquet", "train_questions.parquet"):
        assert (tmp_path / "a" / "prepared" / name).read_bytes() == (tmp_path / "b" / "prepared" / name).read_bytes()
    raw = (tmp_path / "a" / "prepared" / "train.parquet").read_bytes()
    assert str(package_dir("easy_vqa")).encode() not in raw  # no machine path inside
    manifest = read_manifest(tmp_path / "a" / "prepared", "test")
    assert manifest.image_root == "package:easy_vqa" and len(manifest.images) == 1000
    questions = read_questions(tmp_path / "a" / "prepared", "test")
    assert len(questions) == 9673 and questions[0]["answers"] and questions[0]["image_id"] in manifest.captions_by_id


def _image_folder(tmp_path, easyvqa_root, n=5):
    folder = tmp_path / "mydata"
    (folder / "imgs").mkdir(parents=True)
    for i in range(n):
        shutil.copy(easyvqa_root / f"data/train/images/{i}.png", folder / "imgs" / f"{i}.png")
    return folder


def test_folder_source_round_trips_csv(tmp_path, easyvqa_root):
    folder = _image_folder(tmp_path, easyvqa_root)
    (folder / "captions.csv").write_text(
        "image,caption,split\n"
        "imgs/0.png,a blue rectangle,train\n"
        "imgs/0.png,\"a rectangle, blue\",train\n"
        "imgs/1.png,a blue triangle,train\n"
        "imgs/2.png,a red triangle,test\n"
    )
    cfg = parse_config({"prepare": {"source": "folder", "folder": str(folder)}})
    report = prepare.run(cfg, Dirs.under(tmp_path))
    assert report == {"test": {"images": 1, "captions": 1}, "train": {"images": 2, "captions": 3}}
    train = read_manifest(tmp_path / "prepared", "train")
    assert train.image_root == "params:prepare.folder"
    assert train.captions_by_id == {"imgs/0.png": ["a blue rectangle", "a rectangle, blue"],
                                    "imgs/1.png": ["a blue triangle"]}
    assert str(tmp_path).encode() not in (tmp_path / "prepared" / "train.parquet").read_bytes()
    root = resolve_image_root(train.image_root, cfg.prepare)
    assert load_image(root / train.images[0].image_path).size == (64, 64)


def test_folder_source_json_without_split_is_split_by_hash(tmp_path, easyvqa_root):
    folder = _image_folder(tmp_path, easyvqa_root)
    rows = [{"image": f"imgs/{i}.png", "caption": f"caption {i}"} for i in range(5)]
    (folder / "captions.json").write_text(json.dumps(rows))
    cfg = PrepareConfig(source="folder", folder=str(folder), test_fraction=0.5)
    splits, _ = folder_source.load(cfg)
    again, _ = folder_source.load(cfg)
    assert [[r.image_id for r in s.images] for s in splits] == [[r.image_id for r in s.images] for s in again]
    assert sum(len(s.images) for s in splits) == 5


@pytest.mark.parametrize(
    "content, message",
    [
        ("picture,caption\nimgs/0.png,x\n", "missing column(s) image"),
        ("image,caption\nimgs/9.png,x\n", "row 2: image file imgs/9.png not found"),
        ("image,caption\n/etc/passwd,x\n", "must be a path inside"),
    ],
)
def test_folder_source_bad_csv_is_one_line(tmp_path, easyvqa_root, content, message):
    folder = _image_folder(tmp_path, easyvqa_root, n=1)
    (folder / "captions.csv").write_text(content)
    with pytest.raises(DatasetError) as err:
        folder_source.load(PrepareConfig(source="folder", folder=str(folder)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_manifest_is_reported(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="unreadable Parquet manifest"):
        read_manifest(tmp_path, "train")
    with pytest.raises(DatasetError, match="run the prepare stage first"):
        read_manifest(tmp_path, "test")


def test_karpathy_split_json(tmp_path, easyvqa_root):
    """COCO-style Karpathy file: filepath + filename, restval joins train, five references per image."""
    images = tmp_path / "coco"
    (images / "val2014").mkdir(parents=True)
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        name = f"COCO_val2014_{i:012d}.png"
        shutil.copy(easyvqa_root / f"data/train/images/{i}.png", images / "val2014" / name)
        entries.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": i,
                        "sentences": [{"raw": f"caption {i}.{k} "} for k in range(5)]})
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"dataset": "coco", "images": entries}))
    cfg = parse_config({"prepare": {"source": "karpathy", "folder": str(images), "annotations": str(ann)}})
    report = prepare.run(cfg, Dirs.under(tmp_path))
    assert report == {"test": {"images": 1, "captions": 5}, "train": {"images": 2, "captions": 10},
                      "val": {"images": 1, "captions": 5}}
    train = read_manifest(tmp_path / "prepared", "train")
    assert train.images[1].image_path == "val2014/COCO_val2014_000000000001.png"
    assert train.images[0].captions[0] == "caption 0.0"
    ann.write_text(json.dumps({"images": [{"filename": "x.png"}]}))
    with pytest.raises(DatasetError, match="not a Karpathy split file"):
        karpathy.load(cfg.prepare)


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path, lite0):
    """Brace-pattern shard list, captions from .txt or .json, manifests naming shard/member, images read
    from inside the tars; a corrupt member is skipped at extraction, a truncated shard keeps what precedes
    the damage and lists the rest."""
    from PIL import Image

    from pipeline.extraction import extract_split
    from pipeline.features import FeatureCache
    from shard_writer import truncate, write_shard

    colours = ["red", "green", "blue", "gray", "teal", "brown"]
    images = {f"{s:05d}{k:04d}": Image.new("RGB", (32, 32), colours[(s * 4 + k) % 6]) for s in range(3) for k in range(4)}
    shards = tmp_path / "shards"
    for s in range(3):
        samples = []
        for k in range(4):
            key = f"{s:05d}{k:04d}"
            samples.append((key, images[key], f"a {colours[(s * 4 + k) % 6]} square", ("txt", "json", "both")[k % 3]))
        if s == 1:
            samples[2] = (samples[2][0], b"\xff\xd8\xff\xe0 not really a jpeg", samples[2][2], "txt")
        write_shard(shards / f"{s:05d}.tar", samples)
    truncate(shards / "00002.tar", "000020002.jpg")
    cfg = Config(prepare=PrepareConfig(source="webdataset", folder=str(shards), shards="{00000..00002}.tar",
                                       test_fraction=0.0))
    report = prepare.run(cfg, Dirs.under(tmp_path))
    train = read_manifest(tmp_path / "prepared", "train")
    by_id = {r.image_id: r for r in train.images}
    assert train.image_root == "params:prepare.folder"
    assert by_id["00000.tar/000000000"].image_path == "00000.tar/000000000.jpg"
    assert by_id["00000.tar/000000000"].captions == ["a red square"]  # from .txt
    assert by_id["00000.tar/000000001"].captions == ["a green square"]  # from .json
    assert str(tmp_path).encode() not in (tmp_path / "prepared" / "train.parquet").read_bytes()
    assert len(train.images) == 10  # shard 2 is cut inside its third image: its first two samples only
    assert report["skipped"]["count"] >= 1 and any("00002.tar" in s["image_id"] for s in report["skipped"]["items"])

    root = resolve_image_root(train.image_root, cfg.prepare)
    result = extract_split(train, root, lite0, tmp_path / "features", batch_size=4, block_size=4)
    assert [f["image_id"] for f in result.failed] == ["00001.tar/000010002"]  # the corrupt member
    assert result.failed[0]["reason"].startswith("unreadable image 00001.tar/000010002.jpg")
    with FeatureCache(result.path) as cache:
        assert len(cache.ids) == len(train.images) - 1
        from_tar = cache.tokens(["00000.tar/000000003"]).astype("float32")
    direct = lite0.encode([Image.open(io.BytesIO(png_bytes(images["000000003"], "JPEG"))).convert("RGB")])
    assert np.abs(from_tar - direct.numpy()).max() < 2e-3  # the member, decoded in place, as the file would be
    assert not list(tmp_path.rglob("*.jpg"))  # nothing unpacked


def test_zero_shot_split_holds_combinations_out_of_training_and_labels_test(easyvqa_splits):
    import copy

    splits = copy.deepcopy(list(easyvqa_splits[0].values()))
    report = hold_out_combinations(splits, ("blue circle", "red triangle"))
    by_name = {s.name: s for s in splits}
    train_attrs = [json.loads(r.attributes) for r in by_name["train"].images]
    # no training image shows (or, with an attribute unknown, may show) a held-out combination
    assert not any(may_be_heldout(a, {("blue", "circle"), ("red", "triangle")}) for a in train_attrs)
    assert all("blue circle" not in c and "red triangle" not in c for r in by_name["train"].images for c in r.captions)
    kept = {r.image_id for r in by_name["train"].images}
    assert {q["image_id"] for q in by_name["train"].questions} <= kept
    # every colour and every shape is still seen in training, fully labelled
    both = [a for a in train_attrs if {"color", "shape"} <= a.keys()]
    assert {a["color"] for a in both} == set(COLORS) and {a["shape"] for a in both} == set(SHAPES)
    test = [json.loads(r.attributes) for r in by_name["test"].images]
    unseen = [a for a in test if a.get("zero_shot") == "unseen"]
    assert not any("domain" in a for a in test)  # the zero-shot split is its own attribute, not a source's domain
    assert unseen and all((a["color"], a["shape"]) in {("blue", "circle"), ("red", "triangle")} for a in unseen)
    assert report["test_domains"]["unseen"] == len(unseen) and report["train_images_removed"] == 4000 - len(kept)


def test_zero_shot_split_refuses_unknown_or_total_hold_outs(easyvqa_splits):
    import copy

    from pipeline.errors import ConfigError

    splits = copy.deepcopy(list(easyvqa_splits[0].values()))
    with pytest.raises(ConfigError, match=r"prepare.heldout\[0\]: expected '<colour> <shape>'"):
        hold_out_combinations(splits, ("purple circle",))
    with pytest.raises(ConfigError, match="every combination of the colour 'blue'"):
        hold_out_combinations(splits, ("blue circle", "blue rectangle", "blue triangle"))


def test_validation_split_is_carved_out_of_train_by_content(easyvqa_splits):
    import copy

    splits = carve_validation(copy.deepcopy(list(easyvqa_splits[0].values())), 0.1)
    by_name = {s.name: s for s in splits}
    train, val = ({r.image_id for r in by_name[n].images} for n in ("train", "val"))
    assert not train & val and len(train | val) == 4000 and 300 < len(val) < 500
    assert {q["image_id"] for q in by_name["val"].questions} <= val
    again = carve_validation(copy.deepcopy(list(easyvqa_splits[0].values())), 0.1)
    assert {r.image_id for r in next(s for s in again if s.name == "val").images} == val  # stable
