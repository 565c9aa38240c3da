"""Hostile and broken inputs, written for real: image paths that leave their folder (`..`, absolute,
symlinks out), tar members with such names, duplicate ids, odd captions, and generated captions files
and params, and files that break a parser (non-UTF-8, nested 100,000 deep, a 5,000-digit number, binary) through
the real commands in a subprocess. Each is refused in one line or skipped with its reason in the prepare
report, never a traceback; a refused path is never opened (Python's audit hook sees every open)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, PrepareConfig, load_config
from pipeline.errors import DatasetError
from pipeline.sources import cc3m, folder, karpathy, nocaps, webdataset
from pipeline.sources.common import MAX_CAPTION_CHARS

REPO = Path(__file__).resolve().parents[1]
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_files():
    """Every path opened inside the block (files, not just images)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


@pytest.fixture
def outside(tmp_path, easyvqa_root):
    """A real image outside the data folder: the target every hostile path aims at."""
    target = tmp_path / "outside" / "secret.png"
    target.parent.mkdir()
    shutil.copy(easyvqa_root / "data/train/images/0.png", target)
    return target


@pytest.fixture
def data(tmp_path, easyvqa_root):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    for i in range(3):
        shutil.copy(easyvqa_root / f"data/train/images/{i}.png", root / "imgs" / f"{i}.png")
    return root


def never_opened(opened: list[str], target: Path) -> bool:
    return not any(Path(p).resolve() == target.resolve() for p in opened)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_folder_paths_that_leave_the_folder_are_refused_unread(data, outside, kind):
    rel = {"dotdot": "../outside/secret.png", "absolute": str(outside), "symlink_file": "imgs/link.png",
           "symlink_dir": "out/secret.png"}[kind]
    if kind == "symlink_file":
        (data / "imgs" / "link.png").symlink_to(outside)
    if kind == "symlink_dir":
        (data / "out").symlink_to(outside.parent, target_is_directory=True)
    (data / "captions.csv").write_text(f"image,caption\nimgs/0.png,a circle\n{rel},stolen\n")
    with opened_files() as opened, pytest.raises(DatasetError) as err:
        folder.load(PrepareConfig(source="folder", folder=str(data)))
    one_line(err, "captions.csv: row 3", "refused, nothing was read")
    assert never_opened(opened, outside)


def test_a_symlink_inside_the_folder_is_followed(data):
    (data / "imgs" / "alias.png").symlink_to(data / "imgs" / "1.png")
    (data / "captions.csv").write_text("image,caption\nimgs/alias.png,a shape\n")
    splits, _ = folder.load(PrepareConfig(source="folder", folder=str(data)))
    assert [r.image_path for s in splits for r in s.images] == ["imgs/alias.png"]


def test_karpathy_absolute_filepath_duplicate_entry_and_split_name(data, outside, tmp_path):
    ann = tmp_path / "dataset_coco.json"

    def load(*images):
        ann.write_text(json.dumps({"images": list(images)}))
        return karpathy.load(PrepareConfig(source="karpathy", folder=str(data), annotations=str(ann)))

    ok = {"filepath": "imgs", "filename": "0.png", "split": "train", "sentences": [{"raw": "a shape"}]}
    with opened_files() as opened, pytest.raises(DatasetError) as err:
        load(ok, {"filepath": str(outside.parent), "filename": outside.name, "split": "train",
                  "sentences": [{"raw": "x"}]})
    one_line(err, "images[1]", "an absolute path", "refused")
    assert never_opened(opened, outside)
    with pytest.raises(DatasetError) as err:
        load(ok, dict(ok))
    one_line(err, "images[1]", "also images[0]", "duplicate")
    with pytest.raises(DatasetError) as err:
        load(ok | {"split": "../../etc"})
    one_line(err, "images[0]", "not a split name")


def test_nocaps_symlink_out_and_duplicate_id(data, outside, tmp_path):
    ann = tmp_path / "nocaps.json"
    (data / "imgs" / "link.png").symlink_to(outside)
    cfg = PrepareConfig(source="nocaps", folder=str(data), annotations=str(ann))
    image = {"id": 1, "file_name": "imgs/0.png", "domain": "in-domain"}
    ann.write_text(json.dumps({"images": [image, {"id": 2, "file_name": "imgs/link.png", "domain": "out-domain"}]}))
    with opened_files() as opened, pytest.raises(DatasetError) as err:
        nocaps.load(cfg)
    one_line(err, "images[1].file_name", "symlink", "refused")
    assert never_opened(opened, outside)
    ann.write_text(json.dumps({"images": [image, image | {"file_name": "imgs/1.png"}]}))
    with pytest.raises(DatasetError) as err:
        nocaps.load(cfg)
    one_line(err, "images[1].id", "duplicate id")


def test_cc3m_download_symlinked_out_is_refused_unread(tmp_path, outside):
    root = tmp_path / "cc3m"
    (root / "00000").mkdir(parents=True)
    (root / "00000" / "000000000.json").write_text(json.dumps({"url": "http://a/1.jpg", "status": "success"}))
    (root / "00000" / "000000000.jpg").symlink_to(outside)
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("a dog\thttp://a/1.jpg\n")
    with opened_files() as opened, pytest.raises(DatasetError) as err:
        cc3m.load(PrepareConfig(source="cc3m", folder=str(root), annotations=str(tsv)))
    one_line(err, "cc3m.tsv: line 1", "symlink", "refused")
    assert never_opened(opened, outside)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_members_that_climb_out_duplicates_and_bad_captions_are_skipped(tmp_path, easyvqa_root):
    png = (easyvqa_root / "data/train/images/0.png").read_bytes()
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, caption in [("000", b"a good caption"), ("001", b"caf\xe9 latin-1"), ("002", b"  "),
                             ("003", b"bell\x07"), ("004", b"tab\tand\nnewline")]:
            _add(tar, f"{key}.png", png)
            _add(tar, f"{key}.txt", caption)
        _add(tar, "../evil.png", png)
        _add(tar, "/abs/evil.png", png)
        _add(tar, "000.png", png)  # the same key again, later in the shard
        for name, kind in (("005.png", tarfile.SYMTYPE), ("006.png", tarfile.LNKTYPE)):  # links: never followed
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "000.png"
            tar.addfile(info)
    splits, report = webdataset.load(PrepareConfig(source="webdataset", folder=str(root), shards="00000.tar",
                                                   test_fraction=0.0))
    captions = {r.image_id: r.captions for s in splits for r in s.images}
    assert captions == {"00000.tar/000": ["a good caption"], "00000.tar/001": [], "00000.tar/002": [],
                        "00000.tar/003": [], "00000.tar/004": ["tab and newline"]}
    by_member = {item["image_id"]: item["reason"] for item in report["skipped"]["items"]}
    assert by_member == {"00000.tar/../evil": "a member name that climbs out with '..'",
                         "00000.tar//abs/evil": "an absolute member name",
                         "00000.tar/000": "a key seen earlier in the shard",
                         "00000.tar/005.png": "a symbolic link member (not read)",
                         "00000.tar/006.png": "a hard link member (not read)"}
    assert report["captions_skipped"]["reasons"] == {"control character": 1, "empty": 1, "not UTF-8 text": 1}


def test_captions_empty_long_control_and_files_not_utf8(data):
    long = "word " * (MAX_CAPTION_CHARS // 4)
    (data / "captions.json").write_text(json.dumps([
        {"image": "imgs/0.png", "caption": "  a  red\tcircle\n"}, {"image": "imgs/0.png", "caption": ""},
        {"image": "imgs/1.png", "caption": long}, {"image": "imgs/1.png", "caption": "nul\x00byte"},
        {"image": "imgs/2.png", "caption": None}, {"image": "imgs/2.png", "caption": "\u202eok, not a control"}]))
    splits, report = folder.load(PrepareConfig(source="folder", folder=str(data), test_fraction=0.0))
    assert {r.image_id: r.captions for s in splits for r in s.images} == {
        "imgs/0.png": ["a red circle"], "imgs/1.png": [], "imgs/2.png": ["\u202eok, not a control"]}
    skipped = report["captions_skipped"]
    assert skipped["reasons"] == {"control character": 1, "empty": 1,
                                  f"longer than {MAX_CAPTION_CHARS} characters": 1, "not text": 1}
    assert skipped["first"][0]["where"].endswith("captions.json: entry 1")
    (data / "captions.json").unlink()
    (data / "captions.csv").write_bytes("image,caption\nimgs/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        folder.load(PrepareConfig(source="folder", folder=str(data)))
    one_line(err, "captions.csv", "not UTF-8 text")
    (data / "captions.csv").write_bytes(b"image,caption\nimgs/0.png,a\x00b\n")
    splits, report = folder.load(PrepareConfig(source="folder", folder=str(data)))  # NUL: csv reads it, the screen skips
    assert report["captions_skipped"]["reasons"] == {"control character": 1}


# Generated files: prepare and config loading accept them or fail in one line, never a traceback.
cells = st.text(st.characters(codec="utf-8"), max_size=40)
images = st.sampled_from(["imgs/0.png", "imgs/1.png", "imgs/9.png", "../x.png", "/etc/passwd", "", "imgs"])
rows = st.lists(st.fixed_dictionaries({"image": st.one_of(images, cells), "caption": st.one_of(cells, st.none()),
                                       "split": st.one_of(st.sampled_from(["train", "test", ""]), cells)}),
                max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, as_csv=st.booleans(), junk=st.binary(max_size=30))
@example(rows=[{"image": "\x00", "caption": None, "split": "train"}], as_csv=False, junk=b"")  # found: a traceback
@example(rows=[{"image": "0\n0", "caption": None, "split": "train"}], as_csv=False, junk=b"")  # found: two lines
def test_generated_captions_files_load_or_fail_in_one_line(data, rows, as_csv, junk):
    for name in ("captions.csv", "captions.json"):
        (data / name).unlink(missing_ok=True)
    if as_csv:
        with open(data / "captions.csv", "w", newline="", encoding="utf-8") as f:
            import csv
            writer = csv.DictWriter(f, ["image", "caption", "split"])
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        if junk:
            with open(data / "captions.csv", "ab") as f:
                f.write(junk)
    else:
        (data / "captions.json").write_text(json.dumps(rows))
    try:
        splits, report = folder.load(PrepareConfig(source="folder", folder=str(data)))
    except DatasetError as err:
        assert "\n" not in str(err) and str(data) in str(err)
        return
    for split in splits:
        for row in split.images:
            assert (data / row.image_path).resolve().is_relative_to(data.resolve())
            assert all(c and c == " ".join(c.split()) for c in row.captions)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
    | st.sampled_from(["imgs/0.png", "../x.png", "a caption"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["image", "caption", "split"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=json_values)
@example(content=[{"image": "imgs/0.png", "caption": [{"caption": "a"}]}])
@example(content=[{"image": {"image": "imgs/0.png"}, "caption": "a"}])
def test_generated_nested_captions_json_loads_or_fails_in_one_line(data, content):
    """Any JSON structure in captions.json (nested lists and objects, wrong types at any depth)."""
    (data / "captions.csv").unlink(missing_ok=True)
    (data / "captions.json").write_text(json.dumps(content))
    try:
        folder.load(PrepareConfig(source="folder", folder=str(data)))
    except DatasetError as err:
        assert "\n" not in str(err) and str(data) in str(err)


PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def params_keys(node: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Every key of params.yaml as a path, sections and their fields at every depth."""
    return [k for key, value in node.items()
            for k in [prefix + (key,)] + (params_keys(value, prefix + (key,)) if isinstance(value, dict) else [])]


KEYS = params_keys(PARAMS)
values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def test_the_generated_params_cover_every_key_of_the_schema():
    from pipeline.config import Config, plain

    assert set(params_keys(plain(Config()))) - {("preset",)} <= set(KEYS)
    assert {("methods", "contrastive", "learn_temperature"), ("evaluate", "taxonomy", "bootstrap"),
            ("train", "validation", "every")} <= set(KEYS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3),
       extra=st.one_of(st.none(), st.text(min_size=1, max_size=10)))
def test_generated_params_load_or_fail_in_one_line(tmp_path, changes, extra):
    params = json.loads(json.dumps(PARAMS))
    for path, value in changes:
        node = params
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):  # (an earlier change may have replaced the section)
            node[path[-1]] = value
    if extra:
        params[extra] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    try:
        load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(str(path))


# ---------------------------------------------------------------- files that break a parser, as commands see them
HOSTILE_JSON = {
    "deeply nested": "[" * 100_000,
    "not UTF-8": b'[{"image": "a.png", "caption": "caf\xe9"}]',
    "a huge number": '[{"image": "a.png", "caption": "x", "split": ' + "9" * 5000 + "}]",
    "binary": bytes(range(256)) * 4,
    "empty": b"",
}
HOSTILE_PARAMS = {
    "not UTF-8": b"train:\n  lr: 0.01 \xff\n",
    "deeply nested": "[" * 100_000,
    "binary": bytes(range(256)),
    "empty list": "[]",
}


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_naming(proc: subprocess.CompletedProcess, name: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], proc.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", sorted(HOSTILE_PARAMS))
def test_a_hostile_params_file_is_one_line(tmp_path, case):
    params = tmp_path / "params.yaml"
    content = HOSTILE_PARAMS[case]
    params.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line_naming(run_python(["-m", "vlap.cli", "config", "--params", str(params)], tmp_path), str(params))
    assert case != "not UTF-8" or "not UTF-8 text" in line


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_a_hostile_captions_json_stops_prepare_in_one_line(tmp_path, case):
    photos = tmp_path / "photos"
    photos.mkdir()
    content = HOSTILE_JSON[case]
    (photos / "captions.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] |= {"source": "folder", "folder": str(photos), "heldout": []}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    line = one_line_naming(run_python(["-m", "stages.prepare"], tmp_path), str(photos / "captions.json"))
    assert {"deeply nested": "nested too deeply", "not UTF-8": "not UTF-8 text",
            "a huge number": "cannot read"}.get(case, "") in line
    assert not (tmp_path / "data" / "prepared" / "train.parquet").exists()


HOSTILE_CSV = {  # captions.csv beside one real image, a.png
    "an embedded NUL": b"image,caption\na.png,a blue\x00 circle\n",
    "an unclosed quote": b'image,caption\na.png,"a blue circle\nb.png,a red square\n',
    "a short row": b"image,caption\na.png\n",
    "a long row": b"image,caption\na.png,a blue circle,extra,more\n",
    "a field past the csv limit": b"image,caption\na.png," + b"x" * 200_000 + b"\n",
    "a million columns": b"image,caption," + b",".join(b"c%d" % i for i in range(1_000_000)) + b"\na.png,a blue circle\n",
    "only a header": b"image,caption\n",
    "not CSV at all": bytes(range(1, 256)) * 10,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CSV))
def test_a_hostile_captions_csv_is_one_line_or_reported(tmp_path, case, easyvqa_root):
    """prepare as a subprocess: a captions.csv it cannot use is one line naming it; one it can use prepares, with
    what it skipped in the report. Never a traceback."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next(easyvqa_root.rglob("*.png")), photos / "a.png")
    (photos / "captions.csv").write_bytes(HOSTILE_CSV[case])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] |= {"source": "folder", "folder": str(photos), "heldout": [], "validation_fraction": 0.0,
                          "test_fraction": 0.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_python(["-m", "stages.prepare"], tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if proc.returncode:
        one_line_naming(proc, str(photos / "captions.csv"))
        assert not (tmp_path / "data" / "prepared" / "train.parquet").exists()
        assert case in ("an unclosed quote", "a field past the csv limit", "only a header", "not CSV at all"), case
    else:
        report = json.loads((tmp_path / "data" / "prepared" / "report.json").read_text())
        skipped = {"a short row": "not text", "an embedded NUL": "control character"}.get(case)
        assert report["train"] == {"images": 1, "captions": 0 if skipped else 1}, (case, report)
        assert skipped is None or report["captions_skipped"]["reasons"] == {skipped: 1}
