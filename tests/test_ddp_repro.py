"""Data-parallel training from the pipeline itself: with train.nproc_per_node 2, `dvc repro`, a queued `dvc exp
run` and the Prefect flow's train task start 2 gloo processes under torchrun, train the bridge one process
trains (to the 1e-5 of tests/test_distributed.py) and record it (dvc.lock, the experiment's dvc.lock, the
flow's result) with no `dvc commit` by hand. Settings no launch can meet, and bad input the processes meet,
are one line; a stage killed outright takes its processes with it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dvc_repo import REPO, make_project
from own_data import shrink_cost, write_folder_dataset
from pipeline.bridge import build_bridge, load_bridge
from pipeline.config import load_config
from pipeline.paths import Dirs
from stages import train
from stages.common import run_stage
from tiny_models import save_tiny_clip_vision, save_tiny_opt

pytestmark = pytest.mark.slow  # real dvc repro, torchrun's gloo processes, a Prefect server


def dvc(args: list[str], work: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory, smollm2):
    """A git + DVC repo of the committed params at a test's cost, train.nproc_per_node 2, after
    `dvc repro train@vlap`; and the bridge one process trains on the same inputs (in-process)."""
    root = tmp_path_factory.mktemp("ddp-repro")
    write_folder_dataset(root / "photos")
    clip, opt = save_tiny_clip_vision(root / "models" / "clip"), save_tiny_opt(root / "models" / "opt", smollm2.tokenizer)
    params = shrink_cost(yaml.safe_load((REPO / "params.yaml").read_text()), clip, opt)
    params["prepare"] |= {"source": "folder", "folder": str(root / "photos")}
    params["train"] |= {"nproc_per_node": 2}
    work = root / "repo"
    env = make_project(work, params)
    out = dvc(["repro", "train@vlap"], work, env, timeout=900)

    cfg = load_config(work / "params.yaml")
    one = Dirs.under(work / "data").sharing_inputs(root / "one")
    run_stage(train, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nproc_per_node=1)), one, "vlap")
    return work, env, out.stdout + out.stderr, cfg, one


def same_bridge(folder: Path, reference: Path) -> dict:
    """`folder`'s bridge equals the one-process `reference` within the direct torchrun test's tolerance; its meta."""
    (w, meta), (w1, meta1) = load_bridge(folder), load_bridge(reference)
    assert meta["processes"] == 2 and meta1["processes"] == 1
    torch.manual_seed(meta1["train"]["seed"])  # the seeded initial bridge (pipeline.train.build_training)
    init = build_bridge("linear", meta1["d_vision"], meta1["d_model"]).proj.weight
    assert (w1.proj.weight - init).abs().max() > 1e-3  # training moved it: equal weights below mean equal training
    assert torch.allclose(w.proj.weight, w1.proj.weight, atol=1e-5, rtol=1e-4)
    assert torch.allclose(w.proj.bias, w1.proj.bias, atol=1e-5, rtol=1e-4)
    assert meta["final"]["loss"] == pytest.approx(meta1["final"]["loss"], rel=1e-4)
    # the bridge's config reads as the one-process one's but for the process count (and nothing of the launch)
    assert {k: v for k, v in meta.items() if k not in ("processes", "final")} == \
        {k: v for k, v in meta1.items() if k not in ("processes", "final")}
    return meta


def test_dvc_repro_trains_on_two_processes_and_records_the_bridge(repo):
    work, env, out, cfg, one = repo
    assert "launching 2 process(es) on each of 1 machine(s)" in out and "on 2 process(es)" in out, out[-3000:]
    dvc_yaml = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]["train"]["do"]
    assert dvc_yaml["cmd"] == "python -m stages.train --method ${item}"  # the one-process command, unchanged
    data = Dirs.under(work / "data")
    same_bridge(data.models / "vlap", one.models / "vlap")

    # dvc.lock records what rank 0 wrote, with the process count among the params: no `dvc commit` by hand
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]["train@vlap"]
    assert lock["params"]["params.yaml"]["train"]["nproc_per_node"] == 2
    outs = {o["path"]: o["md5"] for o in lock["outs"]}
    for name in ("model.safetensors", "config.json"):
        path = data.models / "vlap" / name
        assert outs[f"data/models/vlap/{name}"] == hashlib.md5(path.read_bytes()).hexdigest()
    status = json.loads(dvc(["status", "--json", "train@vlap"], work, env).stdout or "{}")
    assert "train@vlap" not in status, status
    assert not (data.models / "checkpoints" / "vlap.safetensors").exists()  # rank 0 finished and removed it


def test_the_flows_train_task_trains_on_two_processes(repo, prefect_server, tmp_path):
    """The flow's task of the stage (what `python -m vlap.flow` runs for train@vlap) on data of its own."""
    from stages import graph
    from vlap import flow

    work, _, _, cfg, one = repo
    dirs = Dirs.under(work / "data").sharing_inputs(tmp_path / "flow")
    node = next(n for n in graph.graph() if n.spec.name == "train")
    state = flow.stage_task(node, "vlap", cfg, dirs, retries=0)("train", str(work / "params.yaml"), str(dirs.root),
                                                                 "vlap", return_state=True)
    assert state.name == "Completed", state
    result = state.result()
    assert result["processes"] == 2 and result["finished"]
    meta = same_bridge(dirs.models / "vlap", one.models / "vlap")
    assert result["final"] == meta["final"]


def test_a_launch_the_params_cannot_make_fails_in_one_line_before_any_process_starts(repo, tmp_path, capsys):
    work, _, _, _, _ = repo
    raw = yaml.safe_load((work / "params.yaml").read_text())
    cases = [({"nproc_per_node": 3}, [], "train.batch_size: 4 must be a multiple of the 3 torchrun processes"),
             ({"nnodes": 2}, [], "train.rdzv_endpoint: expected host:port on node 0"),
             ({"nnodes": 2, "rdzv_endpoint": "node0:29500"}, ["--node-rank", "2"],
              "--node-rank 2: expected 1 to 1 (train.nnodes: 2;")]
    for i, (train_keys, extra, message) in enumerate(cases):
        params = tmp_path / f"params{i}.yaml"
        params.write_text(yaml.safe_dump(raw | {"train": raw["train"] | train_keys}))
        data = Dirs.under(work / "data").sharing_inputs(tmp_path / f"data{i}")
        code = train.main(["--method", "vlap", "--params", str(params), "--data", str(data.root), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
        assert not (data.models / "vlap").exists()


def test_a_queued_experiment_trains_on_two_processes_in_its_own_workspace(repo, tmp_path):
    """`dvc exp run --queue` runs the stage in a copy of the repo (.dvc/tmp/exps): its processes run that copy's
    code, and the experiment's dvc.lock records the bridge they wrote."""
    from safetensors.torch import load_file

    work, env, _, cfg, _ = repo
    dvc(["exp", "run", "--queue", "--name", "ddp-seed1", "-S", "train.seed=1", "train@vlap"], work, env)
    dvc(["exp", "run", "--run-all"], work, env, timeout=900)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=work, env=env,
                          capture_output=True, text=True, check=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/ddp-seed1")]
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=work, env=env, capture_output=True,
                                         text=True, check=True).stdout)["stages"]["train@vlap"]
    assert lock["params"]["params.yaml"]["train"]["nproc_per_node"] == 2
    assert lock["params"]["params.yaml"]["train"]["seed"] == 1

    def cached(name: str) -> Path:
        md5 = next(o["md5"] for o in lock["outs"] if o["path"] == f"data/models/vlap/{name}")
        return work / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]

    assert json.loads(cached("config.json").read_text())["processes"] == 2
    one = Dirs.under(work / "data").sharing_inputs(tmp_path / "one")
    run_stage(train, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nproc_per_node=1, seed=1)), one,
              "vlap")
    weights, reference = load_file(cached("model.safetensors")), load_file(one.models / "vlap" / "model.safetensors")
    for key in ("proj.weight", "proj.bias"):
        assert torch.allclose(weights[key], reference[key], atol=1e-5, rtol=1e-4), key


def params_with(work: Path, folder: Path, **sections: dict) -> Path:
    """The repo's params.yaml with some keys of some sections changed, as folder/params.yaml."""
    raw = yaml.safe_load((work / "params.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw | {k: raw[k] | v for k, v in sections.items()}))
    return folder / "params.yaml"


def test_bad_input_only_the_processes_meet_is_one_line_of_the_stage_too(repo, tmp_path, capfd):
    """An LLM the processes cannot load (the launching process never loads it): each process prints its one
    line, and the stage ends with one line and the exit code of bad input (the flow does not try it again)."""
    work, _, _, _, _ = repo
    params = params_with(work, tmp_path, prototypes={"llm": "no-such-llm"})
    data = Dirs.under(work / "data").sharing_inputs(tmp_path / "data")
    code = train.main(["--method", "vlap", "--params", str(params), "--data", str(data.root)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, err[-20:]
    assert err[-1] == "error: train@vlap: its 2 torchrun processes stopped on bad input (their error lines above)"
    assert any(line.startswith("error: params.yaml: prototypes.llm: unknown language model 'no-such-llm'")
               for line in err), err[-20:]


def test_a_stage_killed_outright_takes_its_processes_with_it(repo, tmp_path):
    """SIGKILL to the stage's process alone (not its group: what the OOM killer does) stops the launcher and
    both ranks, which would otherwise train on and write outputs whose locks nobody holds."""
    import os
    import signal
    import threading

    work, env, _, _, _ = repo
    params = params_with(work, tmp_path, train={"steps": 5000, "checkpoint_every": 5000})
    data = Dirs.under(work / "data").sharing_inputs(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--method", "vlap", "--params", str(params),
                             "--data", str(data.root)], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []

    def read() -> None:  # to the pipe's end: every process that shares the stage's stderr has exited
        seen.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any("on 2 process(es)" in line for line in seen):  # the ranks are up and about to train
        assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    reader.join(timeout=60)
    assert not reader.is_alive(), "processes outlived the killed stage:\n" + "".join(seen)[-3000:]
    assert not (data.models / "vlap" / "model.safetensors").exists()
