"""params.yaml validation: every bad value fails with one line naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_match_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.extract.encoder == "efficientnet-lite0"
    assert cfg.prepare.source == "easyvqa"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"extract": {"encodr": "x"}}, "extract.encodr: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"extract": {"batch_size": "big"}}, "extract.batch_size: expected an integer"),
        ({"extract": {"batch_size": 0}}, "extract.batch_size: expected an integer > 0"),
        ({"extract": {"dtype": "int8"}}, "extract.dtype: expected one of float16, float32"),
        ({"prepare": {"test_fraction": 1.5}}, "prepare.test_fraction: expected a value in [0, 1]"),
        ({"prepare": {"source": 3}}, "prepare.source: expected one of easyvqa, folder"),
        ({"extract": []}, "extract: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="params.yaml")
    text = str(err.value)
    assert text.startswith("params.yaml: ") and message in text
    assert "\n" not in text


def test_numeric_strings_from_yaml_are_numbers():
    cfg = parse_config(yaml.safe_load("prototypes:\n  smoothing: 1e-8\n"))
    assert cfg.prototypes.smoothing == 1e-8


def test_stage_reports_bad_key_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  encoder: efficientnet-lite0\n  bach_size: 8\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.extract", "--params", str(params)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {params}: extract.bach_size: unknown key (expected one of: encoder, batch_size, dtype, device, shard_size, workers, decode_workers, scheduler, tls_ca_file, tls_cert, tls_key)"
    ]
