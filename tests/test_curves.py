"""`vlap curves`: constant schedule, the plateau criterion, a run that stops at its plateau and resumes."""
from __future__ import annotations

import json

import pytest

import torch

from pipeline.bridge import load_bridge
from pipeline.plateau import plateau
from pipeline.train import lr_factor, read_checkpoint
from vlap.curves import Criterion, curve_config, read_curves, run_curves, val_points


def test_constant_schedule_is_flat_after_warm_up_and_cosine_reaches_zero():
    assert [lr_factor(s, 2, 10, "constant") for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)


def test_plateau_reads_the_improvement_over_the_last_window():
    falling = [(s, 10.0 / s) for s in range(10, 110, 10)]  # 10/80 -> 10/100: 20 % better over the last 20 %
    v = plateau(falling, window=0.2, tolerance=0.01)
    assert (v.reached, v.reference_step, v.step) == (False, 80, 100)
    assert v.improvement == pytest.approx(0.2) and v.slope_per_1k < 0
    flat = falling + [(s, 0.1 - 1e-4 * (s - 100) / 10) for s in range(110, 160, 10)]  # 0.1 % over 120 -> 150
    v = plateau(flat, window=0.2, tolerance=0.01)
    assert v.reached and v.reference_step == 120 and v.improvement == pytest.approx(3e-4 / 0.0998)
    assert not plateau(flat, window=0.2, tolerance=0.01, min_step=200).reached  # too early for a verdict
    rising = falling + [(110, 0.2)]  # a rise is no improvement
    assert plateau(rising, window=0.2, tolerance=0.01).reached
    assert plateau([(10, 1.0)]) is None and plateau([(10, 1.0), (11, 0.9)], window=0.2) is None


def test_curve_config_sets_one_lr_a_constant_schedule_and_a_checkpoint_at_every_point(tiny_pipeline):
    cfg, _ = tiny_pipeline
    run = curve_config(cfg, "limber", 100, 16, 3e-4, "fp32", 5, 8, 2)
    assert (run.train.schedule, run.train.steps, run.train.epochs, run.train.checkpoint_every) == ("constant", 100, 0, 5)
    assert (run.train.validation.every, run.train.validation.samples, run.methods.limber.lr) == (5, 8, 3e-4)
    assert run.methods.vlap == cfg.methods.vlap  # only the run's own method changes


@pytest.mark.slow
def test_curves_stop_at_the_plateau_resume_and_report(tiny_pipeline, smollm2, tmp_path):
    cfg, dirs = tiny_pipeline
    work, out = tmp_path / "work", tmp_path / "out"
    # a loose criterion so the tiny run meets it within a few points
    criterion = Criterion(window=0.5, tolerance=0.5, min_steps=4)
    args = dict(methods=["limber"], max_steps=40, batch_size=4, lr=1e-3, precision="fp32", every=2, val_samples=4,
                warmup_steps=1, criterion=criterion, command="vlap curves (test)", work=work, lm=smollm2)
    records = run_curves(cfg, dirs, out, **args)
    r = records["limber"]
    assert r["status"] == "plateau" and r["verdict"]["reached"]
    stopped = r["verdict"]["step"]
    assert 4 <= stopped < 40 and stopped % 2 == 0
    checkpoint = read_checkpoint(work / "limber" / "models" / "checkpoints" / "limber.safetensors", smollm2.device)
    assert checkpoint["step"] == stopped and val_points(checkpoint["history"])[-1][0] == stopped
    bridge, meta = load_bridge(work / "limber" / "models" / "limber")  # the plateau's bridge, for `vlap`
    assert (meta["steps"], meta["stopped_by_until_of"]) == (stopped, 40)
    assert torch.equal(bridge.proj.weight, checkpoint["bridge"]["proj.weight"])
    assert [s for s, _ in read_curves(work / "limber" / "metrics" / "train" / "limber")["val/loss_cap"]] == \
        list(range(2, stopped + 1, 2))
    saved = json.loads((out / "curves.json").read_text())
    assert saved["methods"]["limber"]["verdict"] == r["verdict"] and (out / "curves.png").stat().st_size > 0
    assert "| limber | plateau |" in (out / "report.md").read_text()
    # at its plateau: a second run trains nothing; a stricter criterion resumes from the checkpoint's step
    assert run_curves(cfg, dirs, out, **args)["limber"]["verdict"]["step"] == stopped
    stricter = args | {"criterion": Criterion(window=0.5, tolerance=0.5, min_steps=stopped + 4)}
    later = run_curves(cfg, dirs, out, **stricter)["limber"]["verdict"]["step"]
    assert later >= stopped + 4
    steps = [s for s, _ in read_curves(work / "limber" / "metrics" / "train" / "limber")["train/loss_cap"]]
    assert steps == list(range(1, later + 1))  # resumed, not restarted: every step logged once
