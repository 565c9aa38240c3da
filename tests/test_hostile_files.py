"""Files a user hands over that break a parser: one line naming the file, never a traceback, nothing written.

Each case runs the real command in a subprocess (`vlap config`, `python -m stages.prepare`) and reads its
stderr."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dvc_repo import REPO

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


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
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
    line = one_line_naming(run(["-m", "vlap.cli", "config", "--params", str(params)], tmp_path), str(params))
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
    line = one_line_naming(run(["-m", "stages.prepare"], tmp_path), str(photos / "captions.json"))
    assert {"deeply nested": "nested too deeply", "not UTF-8": "not UTF-8 text",
            "a huge number": "cannot read"}.get(case, "") in line
    assert not (tmp_path / "data" / "prepared" / "train.parquet").exists()
