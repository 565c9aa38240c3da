"""Data-parallel training: `torchrun` with 2 CPU processes (gloo) trains the bridge 1 process trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.manifest import Split, read_manifest, write_split
from pipeline.bridge import load_bridge
from pipeline.config import load_config
from pipeline.paths import Dirs
from stages import extract, prepare, prototypes, train
from stages.common import run_stage
from tiny_models import save_tiny_clip_vision, save_tiny_opt

pytestmark = pytest.mark.slow  # torchrun and spawned gloo process groups

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_inputs(tmp_path_factory, smollm2):
    """Prepared easy-VQA (32 train / 8 test images), tiny-CLIP features and tiny-OPT prototypes."""
    root = tmp_path_factory.mktemp("ddp")
    clip, opt = save_tiny_clip_vision(root / "clip"), save_tiny_opt(root / "opt", smollm2.tokenizer)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "extract": {"encoder": f"hf:{clip}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{opt}"},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "precision": "fp32", "loader_workers": 0,
                  "lr": 0.05, "device": "cpu"},
    }))
    cfg, dirs = load_config(params), Dirs.under(root / "data")
    run_stage(prepare, cfg, dirs)
    for split, n in (("train", 32), ("test", 8)):
        manifest = read_manifest(dirs.prepared, split)
        write_split(dirs.prepared, Split(split, manifest.image_root, manifest.images[:n]))
    run_stage(extract, cfg, dirs)
    run_stage(prototypes, cfg, dirs)
    return params, cfg, dirs


def torchrun(params: Path, data_root: Path, method: str, processes: int) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [Path(sys.executable).parent / "torchrun", "--standalone", f"--nproc-per-node={processes}",
         "-m", "stages.train", "--method", method, "--params", str(params), "--data", str(data_root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["vlap", "contrastive"])
def test_two_gloo_processes_train_the_one_process_bridge(trained_inputs, tmp_path, method):
    params, cfg, dirs = trained_inputs
    one = dirs.sharing_inputs(tmp_path / "one")
    run_stage(train, cfg, one, method)
    two = dirs.sharing_inputs(tmp_path / "two")
    result = torchrun(params, two.root, method, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr

    (w1, meta1), (w2, meta2) = load_bridge(one.models / method), load_bridge(two.models / method)
    assert meta2["processes"] == 2 and meta1["processes"] == 1
    moved = (w1.proj.weight - load_bridge_init(cfg, meta1)).abs().max()
    assert moved > 1e-3  # training changed the weights, so equal weights below mean equal training
    assert torch.allclose(w1.proj.weight, w2.proj.weight, atol=1e-5, rtol=1e-4)
    assert torch.allclose(w1.proj.bias, w2.proj.bias, atol=1e-5, rtol=1e-4)
    # The logged losses are the global batch's, not one rank's.
    for key in ("loss", "loss_cap") + (("loss_ap", "loss_ap_text") if method == "vlap" else ("loss_nce",)):
        assert meta2["final"][key] == pytest.approx(meta1["final"][key], rel=1e-4), key
    # Rank 0 alone wrote: one set of logs, no checkpoint left behind.
    curves = json.loads((two.metrics / "train" / method / "metrics.json").read_text())
    assert curves["step"] == 3
    assert not (two.models / "checkpoints" / f"{method}.safetensors").exists()


def load_bridge_init(cfg, meta) -> torch.Tensor:
    from pipeline.bridge import build_bridge

    torch.manual_seed(cfg.train.seed)
    return build_bridge("linear", meta["d_vision"], meta["d_model"]).proj.weight


def test_a_batch_the_processes_cannot_split_fails_in_one_line(trained_inputs, tmp_path):
    params, _, dirs = trained_inputs
    odd = tmp_path / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["train"]["batch_size"] = 7
    odd.write_text(yaml.safe_dump(raw))
    result = torchrun(odd, dirs.sharing_inputs(tmp_path / "odd").root, "limber", 2)
    assert result.returncode != 0
    assert "train.batch_size: 7 must be a multiple of the 2 torchrun processes" in result.stderr


def _sharded_sinkhorn(rank: int, world: int, init_file: str, scores: torch.Tensor, mu: torch.Tensor, epsilon: float,
                      out: str) -> None:
    """One rank of a sharded solve: its own rows in, its own rows of the plan out."""
    import torch.distributed as dist

    from pipeline.distributed import Ranks
    from pipeline.ot import sinkhorn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = scores.shape[-2] // world
        res = sinkhorn(scores[..., rank * rows:(rank + 1) * rows, :], mu, epsilon, 3, Ranks(rank, world))
        torch.save({"assignments": res.assignments, "log_b": res.log_b, "marginal_error": res.marginal_error},
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


# the float32 blocks (span 0.6 / eps < 80), the float64 scaling domain, the log domain (span 2 / eps > 700)
@pytest.mark.parametrize(("epsilon", "spread", "domain"), [(0.01, 0.3, "float32"), (0.01, 1.0, "float64"),
                                                          (0.001, 1.0, "log")])
def test_sharded_sinkhorn_over_two_gloo_ranks_equals_the_one_process_plan(tmp_path, epsilon, spread, domain):
    import torch.multiprocessing as mp

    from pipeline.ot import FLOAT32_SPAN, SCALING_SPAN, sinkhorn

    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2, 16, 32, generator=g), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=-1)
    scores, mu = spread * z @ words.T, torch.rand(3000, generator=g) ** 4  # (2 problems, B 16, K 3000), a skewed prior
    mu[:10] = 0.0  # zero-mass words stay zero
    mu /= mu.sum()
    span = (scores.amax(-1) - scores.amin(-1)).max() / epsilon
    assert domain == ("float32" if span < FLOAT32_SPAN else "float64" if span < SCALING_SPAN else "log")
    whole = sinkhorn(scores, mu, epsilon, 3)
    mp.spawn(_sharded_sinkhorn, args=(2, str(tmp_path / "store"), scores, mu, epsilon, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert all(p["assignments"].shape == (2, 8, 3000) for p in parts)  # each rank holds only its own rows
    torch.testing.assert_close(torch.cat([p["assignments"] for p in parts], -2), whole.assignments, atol=1e-6, rtol=0)
    for p in parts:
        torch.testing.assert_close(p["log_b"], whole.log_b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(p["marginal_error"], whole.marginal_error, atol=1e-6, rtol=0)
