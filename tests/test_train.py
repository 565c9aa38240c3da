"""Training on cached real easy-VQA features with the real SmolLM2."""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

import pipeline.losses
from pipeline.bridge import load_bridge
from pipeline.config import Config
from pipeline.device import resolve_precision
from pipeline.errors import CacheError
from pipeline.prototypes import build_prototypes, load_prototypes, prototypes_file
from pipeline.distributed import Ranks
from pipeline.train import batch_indices, build_method, compute_losses, lr_factor
from stages import train


def small(cfg: Config, **train_overrides) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def test_prototypes_cache(tiny_pipeline, smollm2):
    cfg, dirs = tiny_pipeline
    protos = load_prototypes(prototypes_file(dirs.prototypes))
    assert protos.prototypes.shape == (49152, 576)
    assert torch.allclose(protos.prototypes.norm(dim=-1), torch.ones(49152), atol=1e-5)
    assert abs(protos.prior.sum().item() - 1) < 1e-5
    assert protos.prior[smollm2.tokenizer.eos_token_id] == 0  # special ids carry no mass
    blue = smollm2.tokenizer(" blue", add_special_tokens=False)["input_ids"][0]
    assert protos.prior[blue] > 100 * protos.prior.median()  # a caption word outweighs an unseen one
    # the prior counts the first word as it follows the prompt (" a"), not its no-space form ("a")
    spaced_a, bare_a = (smollm2.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" a", "a"))
    assert protos.prior[spaced_a] > 100 * protos.prior[bare_a]
    assert torch.allclose(protos.z_t.norm(dim=-1), torch.ones(len(protos.text_index)), atol=1e-5)
    # a second build with the same inputs is a hit
    train_caps = ["a blue rectangle"]
    path, hit = build_prototypes(smollm2, train_caps, train_caps, dataclasses.replace(cfg.prototypes, subset="corpus"),
                                 dirs.prototypes / "other", cfg.train.prompt)
    again, hit2 = build_prototypes(smollm2, train_caps, train_caps,
                                   dataclasses.replace(cfg.prototypes, subset="corpus"), dirs.prototypes / "other",
                                   cfg.train.prompt)
    assert not hit and hit2 and again == path
    corpus = load_prototypes(path)
    assert corpus.prototypes.shape[0] == len(smollm2.caption_token_ids(train_caps, cfg.train.prompt)[0]) == 3


def test_schedule_and_batches_are_pure():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert torch.equal(batch_indices(64, 8, 0, 13), batch_indices(64, 8, 0, 13))
    epoch = torch.cat([batch_indices(64, 8, 0, s) for s in range(8)])
    assert sorted(epoch.tolist()) == list(range(64))  # one epoch sees every sample once


def test_only_the_bridge_receives_gradients(tiny_pipeline, smollm2):
    cfg, dirs = tiny_pipeline
    data = train.load_train_data(cfg, dirs)
    protos = load_prototypes(prototypes_file(dirs.prototypes))
    bridge = torch.nn.Linear(1280, 576)
    prompt_ids = smollm2.prompt_ids(cfg.train.prompt)
    tokens = data.tokens(torch.arange(4)).float()
    method = build_method("vlap", cfg, protos, Ranks())
    terms = compute_losses(method, cfg.train, smollm2, bridge, tokens, data.captions[:4], prompt_ids)
    terms["loss"].backward()
    assert bridge.weight.grad is not None and bridge.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in smollm2.model.parameters())
    assert not smollm2.model.training
    assert {"loss_cap", "loss_ap", "loss_ap_visual", "loss_ap_text", "sinkhorn_marginal_error"} <= terms.keys()


@pytest.mark.slow
def test_vlap_lowers_both_losses(tiny_pipeline, smollm2, tmp_path):
    cfg, dirs = tiny_pipeline
    cfg = small(cfg, steps=18, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=100,
                validation=dataclasses.replace(cfg.train.validation, every=8, samples=12, fit_images=48))
    assert Config().train.validation.every == 10  # on by default; the shared fixture turns it off
    dirs = dirs.sharing_inputs(tmp_path / "data")
    result = train.run(cfg, dirs, "vlap", lm=smollm2)
    assert result["finished"] and result["steps"] == 18
    rows = json.loads((dirs.metrics / "train" / "vlap" / "metrics.json").read_text())["train"]
    tsv = (dirs.metrics / "train" / "vlap" / "plots" / "metrics" / "train" / "loss_cap.tsv").read_text().split()
    cap = [float(x) for x in tsv[3::2]]
    ap = [float(x) for x in (dirs.metrics / "train" / "vlap" / "plots" / "metrics" / "train" /
                             "loss_ap_visual.tsv").read_text().split()[3::2]]
    assert len(cap) == 18
    first, last = sum(cap[:5]) / 5, sum(cap[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert sum(ap[-5:]) / 5 < sum(ap[:5]) / 5, ap
    assert rows["loss_cap"] == pytest.approx(cap[-1])
    bridge, meta = load_bridge(dirs.models / "vlap")
    assert meta["method"] == "vlap" and meta["samples"] == 64 and meta["d_model"] == 576
    # Throughput: every step is timed and logged (its FLOPs counted on a dry run before training), in its own
    # dvclive folder under reports/: the stage's outputs (curves, bridge) stay byte-reproducible.
    assert "throughput" not in json.loads((dirs.metrics / "train" / "vlap" / "metrics.json").read_text())
    speed = json.loads((dirs.reports / "train" / "vlap" / "metrics.json").read_text())["throughput"]
    assert speed == result["throughput"] and speed["timed_steps"] == 18
    # SmolLM2's forward and input-gradient backward over 8 sequences of 32 visual tokens and a caption: ~4·135M·8·40
    # MFU: over a matmul rate measured once at the start; on a shared CPU it can read above 1 (README)
    assert 100 < speed["step_gflop"] < 1000 and 0.01 < speed["mean_mfu"] < 4
    assert speed["mean_samples_per_second"] == pytest.approx(8 / speed["mean_step_seconds"], rel=0.5)
    traces = dirs.reports / "train" / "vlap" / "plots" / "metrics" / "throughput"
    assert {p.stem for p in traces.glob("*.tsv")} == {"step_seconds", "samples_per_second", "mfu", "val_seconds"}
    assert len((traces / "mfu.tsv").read_text().split()) == 2 + 2 * 18  # header + (step, value) per step
    assert "throughput" not in meta["final"]  # timing stays out of the bridge, which must reproduce
    # Validation on the fixed val subset at steps 8, 16 and the last, beside the training curves
    val_dir = dirs.metrics / "train" / "vlap" / "plots" / "metrics" / "val"
    assert {p.stem for p in val_dir.glob("*.tsv")} == {"loss_cap", "loss_ap", "loss_nce", "cosine_i2t_R@1",
                                                       "assignment_i2t_R@1", "centred_i2t_R@1"}
    points = [line.split("\t") for line in (val_dir / "loss_cap.tsv").read_text().splitlines()[1:]]
    assert [int(step) for step, _ in points] == [7, 15, 17]  # dvclive counts steps from 0
    val_cap = [float(v) for _, v in points]
    assert val_cap[-1] < val_cap[0] - 0.5, val_cap  # the held-out captions get likelier too
    val_final = meta["final"]["val"]
    assert val_final["loss_cap"] == pytest.approx(val_cap[-1]) and val_final["loss_ap"] > 0
    assert all(0.0 <= val_final[f"{s}_i2t_R@1"] <= 100.0 for s in ("cosine", "assignment", "centred"))
    val_seconds = (dirs.reports / "train" / "vlap" / "plots" / "metrics" / "throughput" / "val_seconds.tsv")
    assert len(val_seconds.read_text().split()) == 2 + 2 * 3  # its cost, timed at each point


@pytest.mark.slow
def test_precision_auto_is_fp32_on_every_cpu_and_bf16_trains(tiny_pipeline, smollm2, tmp_path):
    """`auto` is fp32 on any CPU, so CPUs with and without native bf16 train the same bridge; an explicit bf16
    runs autocast on any CPU, is recorded in the bridge and gives a finite captioning loss."""
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # on every CPU, whatever its bf16 support
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    cfg, dirs = tiny_pipeline
    # one step: bf16 on a CPU without native bf16 is emulated (each SmolLM2 pass takes seconds)
    cfg = small(cfg, steps=1, batch_size=2, lr=1e-2, warmup_steps=1, precision="bf16", checkpoint_every=100,
                loader_workers=0)
    dirs = dirs.sharing_inputs(tmp_path / "data")
    assert train.run(cfg, dirs, "limber", lm=smollm2)["finished"]
    _, meta = load_bridge(dirs.models / "limber")
    assert meta["precision"] == "bf16" and meta["train"]["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(meta["final"]["loss_cap"]))


def test_limber_never_calls_sinkhorn(tiny_pipeline, smollm2, monkeypatch, tmp_path):
    cfg, dirs = tiny_pipeline
    calls = []
    real = pipeline.losses.sinkhorn
    monkeypatch.setattr(pipeline.losses, "sinkhorn", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = small(cfg, steps=2, batch_size=4, checkpoint_every=100)
    train.run(cfg, dirs.sharing_inputs(tmp_path / "l"), "limber", lm=smollm2)
    assert calls == []
    train.run(cfg, dirs.sharing_inputs(tmp_path / "v"), "vlap", lm=smollm2)
    # the spy works: one batched call per vlap step, plus the dry run that counts a step's FLOPs
    assert len(calls) == 3


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tiny_pipeline, smollm2, tmp_path):
    cfg, dirs = tiny_pipeline
    cfg = small(cfg, steps=4, batch_size=4, checkpoint_every=1, warmup_steps=1)
    full_dirs, resumed_dirs = dirs.sharing_inputs(tmp_path / "full"), dirs.sharing_inputs(tmp_path / "resumed")
    train.run(cfg, full_dirs, "contrastive", lm=smollm2)
    partial = train.run(cfg, resumed_dirs, "contrastive", lm=smollm2, stop_after=2)
    assert not partial["finished"] and partial["steps"] == 2
    assert (resumed_dirs.models / "checkpoints" / "contrastive.safetensors").exists()
    done = train.run(cfg, resumed_dirs, "contrastive", lm=smollm2)
    assert done["finished"] and done["steps"] == 4
    full, _ = load_bridge(full_dirs.models / "contrastive")
    resumed, _ = load_bridge(resumed_dirs.models / "contrastive")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # the saved files are byte-identical too (reproducible outputs)
    assert (full_dirs.models / "contrastive" / "model.safetensors").read_bytes() == \
        (resumed_dirs.models / "contrastive" / "model.safetensors").read_bytes()
    tsv = resumed_dirs.metrics / "train" / "contrastive" / "plots" / "metrics" / "train" / "loss_nce.tsv"
    assert len(tsv.read_text().strip().splitlines()) == 1 + 4  # header + every step once


def test_prior_is_normalised_document_frequency_with_specials_zeroed(tiny_pipeline, smollm2):
    cfg, dirs = tiny_pipeline
    protos = load_prototypes(prototypes_file(dirs.prototypes))
    from pipeline.manifest import read_manifest

    captions = [c for r in read_manifest(dirs.prepared, "train").images for c in r.captions]
    df = {}
    prompt = smollm2.tokenizer.encode(cfg.train.prompt, add_special_tokens=False)
    for caption in captions:  # document frequency of the caption's tokens as they follow the prompt
        joined = smollm2.tokenizer.encode(f"{cfg.train.prompt} {caption}", add_special_tokens=False)
        assert joined[: len(prompt)] == prompt
        for token in set(joined[len(prompt):]):
            df[token] = df.get(token, 0) + 1
    K = protos.prototypes.shape[0]
    mu = torch.zeros(K, dtype=torch.float64)
    for token, count in df.items():
        mu[token] = count ** cfg.prototypes.temperature
    mu = mu / mu.sum() + cfg.prototypes.smoothing
    mu[list(set(smollm2.tokenizer.all_special_ids))] = 0.0
    mu = mu / mu.sum()
    torch.testing.assert_close(protos.prior.double(), mu, rtol=1e-5, atol=1e-12)


def test_prototype_cache_key_follows_llm_captions_and_prior_and_switching_back_hits(smollm2, tmp_path):
    """The key changes with the LLM, the captions and the prior settings, not with batch size or device;
    going back to earlier settings finds the earlier file."""
    from tiny_models import save_tiny_opt
    from pipeline.lms import load_lm
    from pipeline.prototypes import prototypes_key

    caps, P = ["a blue circle", "a red triangle"], "A picture of"
    base = dataclasses.replace(Config().prototypes, subset="corpus")
    key = prototypes_key(smollm2, caps, caps, base, P)
    changed = {
        "prior": dataclasses.replace(base, prior="uniform"),
        "temperature": dataclasses.replace(base, temperature=0.5),
        "smoothing": dataclasses.replace(base, smoothing=1e-6),
        "subset": dataclasses.replace(base, subset="vocab"),
    }
    for name, other in changed.items():
        assert prototypes_key(smollm2, caps, caps, other, P) != key, name
    assert prototypes_key(smollm2, caps, caps, dataclasses.replace(base, batch_size=7, device="cpu"), P) == key
    assert prototypes_key(smollm2, caps + ["a gray shape"], caps, base, P) != key  # training captions
    assert prototypes_key(smollm2, caps, caps + ["a gray shape"], base, P) != key  # texts needing z_t
    opt = load_lm(f"hf:{save_tiny_opt(tmp_path / 'opt', smollm2.tokenizer)}", torch.device("cpu"))
    assert prototypes_key(opt, caps, caps, base, P) != key  # another LLM
    assert prototypes_key(smollm2, caps, caps, base, "A photo of") != key  # the prompt the prior counts after
    assert prototypes_key(smollm2, caps, caps, base, P + " ") == key  # trailing space: the same text
    first, hit = build_prototypes(smollm2, caps, caps, base, tmp_path / "protos", P)
    second, _ = build_prototypes(smollm2, caps, caps, changed["temperature"], tmp_path / "protos", P)
    back, hit_back = build_prototypes(smollm2, caps, caps, base, tmp_path / "protos", P)
    assert not hit and second != first and hit_back and back == first


class Runs:
    """Unpickling it creates the file at `path`: what a pickle from elsewhere could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_damaged_checkpoint_stops_in_one_line_and_one_from_other_settings_is_reported(
        tiny_pipeline, smollm2, tmp_path, caplog):
    cfg, dirs = tiny_pipeline
    cfg = small(cfg, steps=2, batch_size=4, checkpoint_every=1, warmup_steps=1)
    dirs = dirs.sharing_inputs(tmp_path / "run")
    checkpoint = dirs.models / "checkpoints" / "contrastive.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 a zip cut short")
    with pytest.raises(CacheError) as err:
        train.run(cfg, dirs, "contrastive", lm=smollm2)
    assert str(err.value).startswith(f"{checkpoint}: unreadable resume checkpoint") and "\n" not in str(err.value)
    assert "delete it to train from step 0" in str(err.value) and checkpoint.read_bytes().endswith(b"cut short")
    # a pickle that would run code when unpickled: refused unread (no pickle is ever loaded)
    marker = tmp_path / "ran"
    checkpoint.write_bytes(pickle.dumps(Runs(str(marker))))
    with pytest.raises(CacheError):
        train.run(cfg, dirs, "contrastive", lm=smollm2)
    assert not marker.exists()
    checkpoint.unlink()
    assert not train.run(cfg, dirs, "contrastive", lm=smollm2, stop_after=1)["finished"]
    caplog.set_level(logging.WARNING, logger="pipeline.train")
    assert train.run(small(cfg, lr=3e-3), dirs, "contrastive", lm=smollm2)["steps"] == 2
    assert f"{checkpoint} was left by other settings (step 1 of another run); starting from step 0" in caplog.text
