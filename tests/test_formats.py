"""The published dataset formats (CC3M, NoCaps, VQAv2) as small fixtures written in their exact layouts,
a training source combined with a test source, and the evaluations on a test split without captions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from pipeline.errors import ConfigError, DatasetError
from pipeline.images import load_image
from pipeline.io import sha256_file
from pipeline.manifest import has_captions, has_questions, manifest_splits, read_manifest, read_questions, resolve_image_root
from pipeline.sources import cc3m, nocaps, vqav2
from pipeline.sources.prepare import load_source
from pipeline.sources.common import split_by_content
from pipeline.config import Config, PrepareConfig, parse_config
from pipeline.paths import Dirs
from stages import evaluate_arithmetic, evaluate_caption, evaluate_retrieval, prepare

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def draw(path: Path, k: int) -> Path:
    """A small distinct image (its own colour and shape size), so every fixture image hashes differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (16, 16), "white")
    ImageDraw.Draw(image).rectangle([2, 2, 4 + k, 4 + k], fill=COLOURS[k % len(COLOURS)])
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(DatasetError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


# ---------------------------------------------------------------- CC3M
def write_cc3m(tmp_path: Path) -> tuple[Path, Path]:
    """The TSV (caption<TAB>url, with the header line img2dataset's instructions add) and img2dataset's
    `files` output: <shard>/<key>.jpg + .txt + .json.
    Keys do not follow TSV order (img2dataset numbers what it downloads per shard), one URL is listed
    twice, one was not downloaded, one download failed (no image, a status other than success)."""
    rows = [("a dog on a beach ", "http://x/dog.jpg"), ("a red car", "http://x/car.jpg"),
            ("gone forever", "http://x/dead.jpg"), ("a cat asleep", "http://x/cat.jpg"),
            ("another dog caption", "http://x/dog.jpg"), ("timed out", "http://x/slow.jpg")]
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("caption\turl\n" + "".join(f"{c}\t{u}\n" for c, u in rows))  # header as img2dataset adds it
    folder = tmp_path / "cc3m"
    downloads = [("00000", "000000000", "http://x/cat.jpg"), ("00000", "000000001", "http://x/dog.jpg"),
                 ("00001", "000010000", "http://x/car.jpg"), ("00001", "000010001", "http://x/other.jpg")]
    for k, (shard, key, url) in enumerate(downloads):
        draw(folder / shard / f"{key}.jpg", k)
        (folder / shard / f"{key}.txt").write_text("caption img2dataset kept")
        (folder / shard / f"{key}.json").write_text(json.dumps(
            {"url": url, "key": key, "status": "success", "caption": "caption img2dataset kept", "width": 16}))
    (folder / "00001" / "000010002.json").write_text(json.dumps(
        {"url": "http://x/slow.jpg", "key": "000010002", "status": "failed_to_download", "caption": "timed out"}))
    (folder / "00000_stats.json").write_text("{}")  # img2dataset's per-shard stats, beside the folders
    return folder, tsv


def test_cc3m_matches_downloads_to_tsv_rows_by_url(tmp_path):
    folder, tsv = write_cc3m(tmp_path)
    cfg = parse_config({"prepare": {"source": "cc3m", "folder": str(folder), "annotations": str(tsv),
                                    "test_fraction": 0.0}})
    report = prepare.run(cfg, Dirs.under(tmp_path))
    assert report["train"] == {"images": 3, "captions": 4}
    assert report["missing"] == {"count": 2, "first_lines": [4, 7]}  # dead link, failed download
    assert report["downloads_not_in_tsv"] == 1
    train = read_manifest(tmp_path / "prepared", "train")
    assert train.image_root == "params:prepare.folder" and manifest_splits(tmp_path / "prepared") == ["train"]
    assert train.captions_by_id == {"00000/000000001.jpg": ["a dog on a beach", "another dog caption"],
                                    "00001/000010000.jpg": ["a red car"], "00000/000000000.jpg": ["a cat asleep"]}
    assert [r.image_path for r in train.images] == [r.image_id for r in train.images]
    assert str(tmp_path).encode() not in (tmp_path / "prepared" / "train.parquet").read_bytes()

    everything_test, _ = cc3m.load(PrepareConfig(source="cc3m", folder=str(folder), annotations=str(tsv),
                                                      test_fraction=1.0))
    assert [s.name for s in everything_test] == ["test"] and len(everything_test[0].images) == 3


def test_cc3m_malformed_files_name_the_file_and_field(tmp_path):
    folder, tsv = write_cc3m(tmp_path)
    cfg = PrepareConfig(source="cc3m", folder=str(folder), annotations=str(tsv))
    tsv.write_text("a dog\thttp://x/dog.jpg\nno url here\n")
    one_line_error(lambda: cc3m.load(cfg), str(tsv), "line 2", "2 tab-separated fields (caption, url)")
    tsv.write_text("a dog\thttp://x/dog.jpg\textra\n")
    one_line_error(lambda: cc3m.load(cfg), str(tsv), "line 1", "got 3")
    tsv.unlink()
    one_line_error(lambda: cc3m.load(cfg), str(tsv), "file not found", "prepare.annotations")
    write_cc3m(tmp_path)
    sidecar = folder / "00000" / "000000001.json"
    sidecar.write_text(json.dumps({"key": "000000001", "status": "success"}))
    one_line_error(lambda: cc3m.load(cfg), str(sidecar), "missing field 'url'")
    sidecar.write_text("{not json")
    one_line_error(lambda: cc3m.load(cfg), str(sidecar), "not valid JSON")


# ---------------------------------------------------------------- NoCaps
def nocaps_doc(domains: list[str]) -> dict:
    images = [{"id": i, "open_images_id": f"{i:016x}", "file_name": f"{i:016x}.jpg", "height": 16, "width": 16,
               "domain": d, "coco_url": f"https://s3.amazonaws.com/nocaps/val/{i:016x}.jpg"}
              for i, d in enumerate(domains)]
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": f"image {i} caption {k}. "}
                   for i in range(len(domains)) for k in range(2)]
    return {"licenses": [], "info": {"description": "nocaps validation dataset"}, "images": images,
            "annotations": annotations}


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain", "near-domain")


def write_nocaps(tmp_path: Path, domains: tuple[str, ...] = NOCAPS_DOMAINS) -> tuple[Path, Path]:
    folder = tmp_path / "nocaps_val"
    doc = nocaps_doc(list(domains))
    for k, image in enumerate(doc["images"]):
        draw(folder / image["file_name"], k)
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps(doc))
    return folder, path


def test_nocaps_is_all_test_with_domains(tmp_path):
    folder, path = write_nocaps(tmp_path)
    splits, report = nocaps.load(PrepareConfig(source="nocaps", folder=str(folder), annotations=str(path)))
    assert [s.name for s in splits] == ["test"]
    assert report["test"] == {"images": 4, "captions": 8,
                              "domains": {"in-domain": 1, "near-domain": 2, "out-domain": 1}}
    rows = splits[0].images
    assert [r.image_id for r in rows] == ["0", "1", "2", "3"]
    assert rows[2].image_path == f"{2:016x}.jpg" and rows[2].captions == ["image 2 caption 0.",
                                                                                "image 2 caption 1."]
    assert [json.loads(r.attributes) for r in rows] == [{"domain": d} for d in NOCAPS_DOMAINS]


def test_nocaps_malformed_files_name_the_file_and_field(tmp_path):
    folder, path = write_nocaps(tmp_path)
    cfg = PrepareConfig(source="nocaps", folder=str(folder), annotations=str(path))
    doc = json.loads(path.read_text())
    del doc["images"][1]["domain"]
    path.write_text(json.dumps(doc))
    one_line_error(lambda: nocaps.load(cfg), str(path), "images[1]", "'domain'")
    doc = nocaps_doc(["in-domain"] * 4)
    doc["annotations"][3]["caption"] = None
    path.write_text(json.dumps(doc))
    one_line_error(lambda: nocaps.load(cfg), str(path), "annotations[3].caption", "expected str")
    path.write_text(json.dumps({"annotations": []}))
    one_line_error(lambda: nocaps.load(cfg), str(path), "missing field 'images'")
    path.write_text(json.dumps(nocaps_doc(["in-domain"] * 5)))  # image 4 was never drawn
    one_line_error(lambda: nocaps.load(cfg), str(path), "images[4].file_name", "not found under prepare.folder")
    path.unlink()
    one_line_error(lambda: nocaps.load(cfg), str(path), "file not found")


# ---------------------------------------------------------------- VQAv2
ANSWERS = {  # question_id -> (image_id, question, ten answers, question_type, answer_type)
    4200: (42, "Is the sky blue?", ["yes"] * 9 + ["no"], "is the", "yes/no"),
    4201: (42, "How many dogs are there?", ["2"] * 7 + ["two", "3", "2"], "how many", "number"),
    700: (7, "What color is the car?", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3, "what color is the", "other"),
}


def write_vqav2(tmp_path: Path, subtype: str = "val2014", in_subfolder: bool = True) -> tuple[Path, Path, Path]:
    folder = tmp_path / "coco"
    for k, image_id in enumerate((42, 7)):
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        draw(folder / subtype / name if in_subfolder else folder / name, k)
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                 "license": {}, "questions": [{"image_id": i, "question": q, "question_id": qid}
                                              for qid, (i, q, _, _, _) in ANSWERS.items()]}
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {}, "annotations": [
        {"question_id": qid, "image_id": i, "question_type": qt, "answer_type": at,
         "multiple_choice_answer": answers[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)]}
        for qid, (i, _, answers, qt, at) in ANSWERS.items()]}
    q_path = tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    a_path = tmp_path / f"v2_mscoco_{subtype}_annotations.json"
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    return folder, q_path, a_path


def vqav2_config(folder: Path, q_path: Path, a_path: Path) -> PrepareConfig:
    return PrepareConfig(source="vqav2", folder=str(folder), questions=str(q_path), annotations=str(a_path))


def test_vqav2_questions_with_ten_answers_and_types(tmp_path):
    folder, q_path, a_path = write_vqav2(tmp_path)
    cfg = Config(prepare=vqav2_config(folder, q_path, a_path))
    report = prepare.run(cfg, Dirs.under(tmp_path))
    assert report["test"] == {"images": 2, "captions": 0, "questions": 3,
                              "answer_types": {"number": 1, "other": 1, "yes/no": 1}}
    test = read_manifest(tmp_path / "prepared", "test")
    assert [(r.image_id, r.image_path, r.captions) for r in test.images] == [
        ("42", "val2014/COCO_val2014_000000000042.jpg", []), ("7", "val2014/COCO_val2014_000000000007.jpg", [])]
    questions = {q["question_id"]: q for q in read_questions(tmp_path / "prepared", "test")}
    assert questions["4201"] == {"question_id": "4201", "image_id": "42", "question": "How many dogs are there?",
                                 "answers": ANSWERS[4201][2], "question_type": "how many", "answer_type": "number"}
    assert all(len(q["answers"]) == 10 for q in questions.values())
    assert not has_captions(tmp_path / "prepared", "test") and has_questions(tmp_path / "prepared", "test")

    flat = tmp_path / "flat"
    splits, _ = vqav2.load(vqav2_config(*write_vqav2(flat, "train2014", in_subfolder=False)))
    assert [s.name for s in splits] == ["train"]  # a train* subtype is training data
    assert splits[0].images[0].image_path == "COCO_train2014_000000000042.jpg"  # images straight in the folder


def test_vqav2_malformed_files_name_the_file_and_field(tmp_path):
    folder, q_path, a_path = write_vqav2(tmp_path)
    cfg = vqav2_config(folder, q_path, a_path)
    annotations = json.loads(a_path.read_text())
    del annotations["annotations"][1]["answer_type"]
    a_path.write_text(json.dumps(annotations))
    one_line_error(lambda: vqav2.load(cfg), str(a_path), "annotations[1]", "'answer_type'")
    del annotations["annotations"][1]
    a_path.write_text(json.dumps(annotations))
    one_line_error(lambda: vqav2.load(cfg), str(a_path), "no annotation for question_id 4201")
    write_vqav2(tmp_path)
    questions = json.loads(q_path.read_text())
    questions["questions"][2]["image_id"] = "7"
    q_path.write_text(json.dumps(questions))
    one_line_error(lambda: vqav2.load(cfg), str(q_path), "questions[2].image_id", "expected int")
    questions["questions"][2]["image_id"] = 99
    q_path.write_text(json.dumps(questions))
    one_line_error(lambda: vqav2.load(cfg), str(q_path), "COCO_val2014_000000000099.jpg not found")
    questions["data_subtype"] = "../../outside"  # names files and a folder: refused before any path is looked at
    q_path.write_text(json.dumps(questions))
    one_line_error(lambda: vqav2.load(cfg), str(q_path), "data_subtype '../../outside'", "plain name")
    del questions["data_subtype"]
    q_path.write_text(json.dumps(questions))
    one_line_error(lambda: vqav2.load(cfg), str(q_path), "missing field 'data_subtype'")
    q_path.write_text("[1, 2")
    one_line_error(lambda: vqav2.load(cfg), str(q_path), "not valid JSON")
    with pytest.raises(ConfigError, match="prepare.questions"):
        vqav2.load(PrepareConfig(source="vqav2", folder=str(folder), annotations=str(a_path)))


# ---------------------------------------------------------------- a training source and a test source
def test_test_source_replaces_the_training_sources_test_split(tmp_path):
    """Folder (captions.csv) for training, NoCaps for testing: every folder image trains (hashing would have
    put some in test), the test manifest is NoCaps' with its own symbolic root."""
    train_folder = tmp_path / "mine"
    for k in range(6):
        draw(train_folder / f"{k}.png", k)
    (train_folder / "captions.csv").write_text("image,caption\n" + "".join(f"{k}.png,a {COLOURS[k]} square\n"
                                                                           for k in range(6)))
    nocaps_folder, nocaps_json = write_nocaps(tmp_path)
    params = {"source": "folder", "folder": str(train_folder), "test_fraction": 0.5, "test_source": "nocaps",
              "test_folder": str(nocaps_folder), "test_annotations": str(nocaps_json)}
    cfg = parse_config({"prepare": params})
    assert {split_by_content(sha256_file(train_folder / f"{k}.png"), 0.5) for k in range(6)} == {
        "train", "test"}  # without test_source some of these would be test images
    report = prepare.run(cfg, Dirs.under(tmp_path))
    assert report["train"] == {"images": 6, "captions": 6}
    assert report["test"]["images"] == 4 and report["test_source"] == {"source": "nocaps"}
    prepared = tmp_path / "prepared"
    assert manifest_splits(prepared) == ["test", "train"]
    test, train = read_manifest(prepared, "test"), read_manifest(prepared, "train")
    assert train.image_root == "params:prepare.folder" and test.image_root == "params:prepare.test_folder"
    assert json.loads(test.images[0].attributes) == {"domain": "in-domain"}
    assert resolve_image_root(test.image_root, cfg.prepare) == nocaps_folder
    assert load_image(nocaps_folder / test.images[0].image_path).size == (16, 16)
    assert str(tmp_path).encode() not in (prepared / "test.parquet").read_bytes()

    # VQAv2 as the test source; its messages name the test_* keys the user set
    folder, q_path, a_path = write_vqav2(tmp_path)
    cfg = parse_config({"prepare": params | {"test_source": "vqav2", "test_folder": str(folder),
                                             "test_annotations": str(a_path), "test_questions": str(q_path)}})
    splits, report = load_source(cfg.prepare)
    assert [(s.name, s.image_root, len(s.questions)) for s in splits] == [
        ("test", "params:prepare.test_folder", 3), ("train", "params:prepare.folder", 0)]
    with pytest.raises(ConfigError, match="prepare.test_questions"):
        load_source(PrepareConfig(source="folder", folder=str(train_folder), test_source="vqav2",
                                       test_folder=str(folder), test_annotations=str(a_path)))
    train_only = write_vqav2(tmp_path / "train_only", "train2014")
    with pytest.raises(DatasetError, match="prepare.test_source vqav2: its files give no test split"):
        load_source(PrepareConfig(source="folder", folder=str(train_folder), test_source="vqav2",
                                       test_folder=str(train_only[0]), test_questions=str(train_only[1]),
                                       test_annotations=str(train_only[2])))


def test_caption_tasks_are_not_applicable_without_test_captions(tmp_path):
    """A VQAv2 test split has no captions: captioning, retrieval and arithmetic say so instead of failing
    (they stop before reading a bridge or features)."""
    folder, q_path, a_path = write_vqav2(tmp_path)
    cfg = Config(prepare=vqav2_config(folder, q_path, a_path))
    dirs = Dirs.under(tmp_path / "data")
    prepare.run(cfg, dirs)
    for stage, outs in ((evaluate_caption, ("metrics/caption/vlap.json", "plots/caption/vlap/captions.json",
                                            "pages/caption/vlap.html")),
                        (evaluate_retrieval, ("metrics/retrieval/vlap.json",)),
                        (evaluate_arithmetic, ("metrics/arithmetic/vlap.json", "pages/arithmetic/vlap.html"))):
        record = stage.run(cfg, dirs, "vlap")
        assert record["applicable"] is False and "no reference captions" in record["reason"]
        assert all((dirs.root / o).exists() for o in outs)
        assert json.loads((dirs.root / outs[0]).read_text()) == record
