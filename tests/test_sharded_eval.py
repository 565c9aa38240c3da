"""Sharded evaluation: with evaluate.common.nproc_per_node 2, captioning, VQA and retrieval run on 2 torchrun
processes (gloo on the CPU), each on its shard of the items, and rank 0 writes the outputs one process writes,
byte for byte."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import distributed
from pipeline.config import plain
from pipeline.distributed import Ranks
from stages import evaluate_caption, evaluate_retrieval, evaluate_vqa, train

pytestmark = pytest.mark.slow  # torchrun and spawned gloo process groups

REPO = Path(__file__).resolve().parents[1]
LINKED = ("prepared", "features", "prototypes", "models")  # the inputs each run's data root links to
STAGES = {"caption": evaluate_caption, "vqa": evaluate_vqa, "retrieval": evaluate_retrieval}


@pytest.fixture(scope="module")
def trained(tiny_pipeline, smollm2, tmp_path_factory):
    """A limber bridge trained briefly; 5 test images in batches of 2 (3 batches: the 2 ranks get 1 and 2),
    5 questions, 3 new tokens, 8 training images fitting the retrieval scorers."""
    cfg, dirs = tiny_pipeline
    eval_dirs = dirs.sharing_inputs(tmp_path_factory.mktemp("sharded") / "data")
    ev = cfg.evaluate
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=4, batch_size=8, checkpoint_every=100),
        evaluate=dataclasses.replace(
            ev,
            common=dataclasses.replace(ev.common, test_images=5, batch_size=2, device="cpu"),
            caption=dataclasses.replace(ev.caption, max_new_tokens=3, examples=2),
            vqa=dataclasses.replace(ev.vqa, questions=5, shots=1, max_new_tokens=3),
            retrieval=dataclasses.replace(ev.retrieval, fit_images=8),
        ),
    )
    train.run(cfg, eval_dirs, "limber", lm=smollm2)
    return cfg, eval_dirs


def params_file(cfg, path: Path, **common) -> Path:
    raw = {k: v for k, v in plain(cfg).items() if k != "preset"}
    raw["evaluate"]["common"] |= common
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stage_process(name: str, params: Path, data: Path) -> subprocess.CompletedProcess:
    # one thread in every process, as under pytest-xdist: the same kernels in the one process and in each rank
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"stages.{STAGES[name].STAGE.name}", "--method", "limber",
                           "--params", str(params), "--data", str(data)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["caption", "vqa", "retrieval"])
def test_two_gloo_processes_write_the_one_process_outputs(trained, tmp_path, name):
    cfg, dirs = trained
    spec = STAGES[name].STAGE
    written = {}
    for n in (1, 2):
        data = dirs.sharing_inputs(tmp_path / f"data{n}", names=LINKED)
        result = run_stage_process(name, params_file(cfg, tmp_path / f"params{n}.yaml", nproc_per_node=n), data.root)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("torchrun" in result.stderr) == (n == 2)  # the two-process run went through the launcher
        written[n] = {p.relative_to(data.root): p.read_bytes() for p in spec.out_paths(data, "limber")}
        leftovers = [p for p in data.root.rglob("*") if p.is_file() and p.relative_to(data.root) not in written[n]
                     and p.relative_to(data.root).parts[0] not in (*LINKED, ".locks")]
        assert not leftovers, leftovers  # nothing but the declared outputs (rank 1 wrote nothing of its own)
    assert written[2].keys() == written[1].keys()
    for path, one in written[1].items():
        assert written[2][path] == one, f"{path} differs between 1 and 2 processes"
    metrics = json.loads(written[1][Path(spec.expand(spec.outs[0].path, "limber"))])
    assert metrics["applicable"] is True
    if name == "vqa":  # open and closed answers, both settings, for every question
        assert metrics["questions"] == 5 and {"0shot_open_accuracy", "1shot_closed_accuracy"} <= set(metrics)
    else:
        assert metrics["images"] == 5


def test_shards_join_back_in_order():
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [list(distributed.shard(items, Ranks(r, world))) for r in range(world)]
        assert [x for p in parts for x in p] == items  # contiguous, in rank order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.gather_in_order(["a", "b"], Ranks()) == ["a", "b"]


def test_a_bad_process_count_is_one_line(trained, tmp_path):
    cfg, dirs = trained
    data = dirs.sharing_inputs(tmp_path / "data", names=LINKED)
    result = run_stage_process("caption", params_file(cfg, tmp_path / "params.yaml", nproc_per_node=0), data.root)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert err[-1] == f"error: {tmp_path / 'params.yaml'}: evaluate.common.nproc_per_node: expected an integer > 0, " \
                      "got 0", err[-3:]
    assert not (data.metrics / "caption").exists()
