"""Training the bridge on cached features: VLAP and the two baselines, one loop.

No image is decoded and no vision encoder runs here: visual tokens come from the
feature cache, z_t from the prototypes cache. The LLM is frozen (eval mode, no
parameter gradients); only the bridge is optimised (AdamW, warm-up then cosine).
Batches are a pure function of (seed, step), so a run resumed from a checkpoint
ends equal to an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.manifest import read_manifest
from pipeline.bridge import build_bridge, save_bridge, visual_representation
from pipeline.features import FeatureCache, TokenReader, features_file
from pipeline.config import Config, TrainConfig, section_values
from pipeline.device import resolve_precision, training_attention, training_autocast
from pipeline.distributed import Ranks, check_batch, without_launch
from pipeline.errors import CacheError, DatasetError
from pipeline.io import atomic_path, sha256_json
from pipeline.lms import LanguageModel
from pipeline.losses import captioning_loss
from pipeline.methods import method_class
from pipeline.methods.base import Method, MethodConfig
from pipeline.paths import Dirs
from pipeline.prototypes import Prototypes
from pipeline.throughput import Throughput
from pipeline.validation import ValidationSet, validate

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The training samples: where their tokens are in the feature cache, not the tokens themselves."""

    features_path: Path  # the train split's cache file
    rows: np.ndarray  # (n,) cache row of each sample's image
    captions: list[str]  # (n,) one caption per sample
    image_ids: list[str]  # (n,)
    d_vision: int
    n_tokens: int  # N: visual tokens per image
    feature_dtype: str  # the cache's storage dtype (inputs are rounded to it, in training and after)
    features_key: str
    encoder: str  # as the feature cache names it
    encoder_weights_sha256: str  # the bridge only fits features of this encoder

    def tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), N, d_v) float16 tokens of samples `idx`, read from the cache (tests, benches)."""
        return torch.from_numpy(TokenReader(self.features_path).read_rows(self.rows[idx.numpy()]))


class StepBatches(torch.utils.data.Dataset):
    """Item i = the batch of step start + i: (step, sample indices, float16 tokens read from the cache).

    A pure function of (seed, step), so a resumed run sees the same batches. Each worker
    process opens the cache itself and reads only its batch's chunks: memory is bounded by
    the batch and the prefetch depth, never by the size of the split.
    """

    def __init__(self, data: TrainData, batch_size: int, seed: int, start: int, steps: int, ranks: Ranks):
        self.data, self.batch_size, self.seed, self.start, self.steps = data, batch_size, seed, start, steps
        self.ranks = ranks  # under torchrun each process reads only its part of every global batch
        self.reader: TokenReader | None = None  # opened lazily, in the process that reads

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        step = self.start + i
        idx = self.ranks.local_part(batch_indices(len(self.data.rows), self.batch_size, self.seed, step))
        if self.reader is None:
            self.reader = TokenReader(self.data.features_path)
        return step, idx, torch.from_numpy(self.reader.read_rows(self.data.rows[idx.numpy()]))


def load_train_data(cfg: Config, dirs: Dirs) -> TrainData:
    """(image, caption) pairs of the training split that have cached features."""
    manifest = read_manifest(dirs.prepared, "train")
    with FeatureCache(features_file(dirs.features, "train")) as cache:
        pairs = [(r.image_id, c) for r in manifest.images if r.image_id in cache.index for c in r.captions]
        if not pairs:
            raise DatasetError(f"{cache.path}: no training image has both features and a caption")
        if cfg.train.max_samples and len(pairs) > cfg.train.max_samples:
            keep = np.random.default_rng(cfg.train.seed).permutation(len(pairs))[: cfg.train.max_samples]
            pairs = [pairs[i] for i in sorted(keep)]
        ids = [i for i, _ in pairs]
        attrs, (n_tokens, d_vision) = cache.attrs, map(int, cache.file["tokens"].shape[1:])
        rows = cache.rows(ids)  # one per (image, caption) pair; tokens are read per batch while training
    return TrainData(features_path=cache.path, rows=rows, captions=[c for _, c in pairs], image_ids=ids,
                     d_vision=d_vision, n_tokens=n_tokens, feature_dtype=str(attrs["dtype"]),
                     features_key=str(attrs["cache_key"]), encoder=str(attrs["encoder"]),
                     encoder_weights_sha256=str(attrs["encoder_weights_sha256"]))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Sample indices of `step`: epoch-wise permutations, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[offset * batch_size : (offset + 1) * batch_size]


def run_length(tcfg: TrainConfig, n_samples: int) -> tuple[int, int]:
    """(steps, warm-up steps): as given, or from epochs over `n_samples` at the global batch size."""
    if not tcfg.epochs:
        return tcfg.steps, tcfg.warmup_steps
    per_epoch = max(1, n_samples // tcfg.batch_size)  # as batch_indices walks an epoch
    return max(1, round(tcfg.epochs * per_epoch)), round(tcfg.warmup_epochs * per_epoch)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total` (or 1 throughout, `constant`)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def method_config(cfg: Config, method: str) -> MethodConfig:
    return getattr(cfg.methods, method)


def method_lr(cfg: Config, method: str) -> float:
    """The method's own learning rate (methods.<m>.lr, from tuning), else train.lr."""
    return method_config(cfg, method).lr or cfg.train.lr


def build_method(method: str, cfg: Config, protos: Prototypes, ranks: Ranks) -> Method:
    """The registered method `method`, from its params section, in the world of `ranks` (fixed here)."""
    return method_class(method)(method_config(cfg, method), protos, ranks)


def compute_losses(method: Method, tcfg: TrainConfig, lm: LanguageModel, bridge, tokens, captions,
                   prompt_ids) -> dict[str, torch.Tensor]:
    """All loss terms of this process's part of one global batch; 'loss' is the one to minimise.

    Each term is this rank's share: the shares of all ranks add up to the term of the global batch
    (in one process, the term itself). A method without captioning weight never runs the LLM here."""
    ranks = method.ranks
    V = bridge(tokens)  # (b, N, D)
    terms, loss = {}, None
    if method.captions:
        caption_ids, caption_mask = lm.tokenize_captions(captions, tcfg.max_caption_tokens, tcfg.prompt)
        tokens_in_batch = ranks.total(caption_mask.sum())  # the mean is over the global batch's caption tokens
        terms["loss_cap"] = captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask, "sum") / tokens_in_batch
        loss = method.config.caption_weight * terms["loss_cap"]
    z_v = visual_representation(V.float())  # (b, D)
    # Cosine scores divided by tau = 0.01 need float32: bf16 keeps ~3 digits.
    with torch.autocast(V.device.type, enabled=False):
        alignment, alignment_terms = method(z_v, captions)
    terms |= alignment_terms
    terms["loss"] = alignment if loss is None else loss + alignment
    return terms


def run_fingerprint(method: str, cfg: Config, data: TrainData, protos: Prototypes, lm: LanguageModel,
                    precision: str) -> str:
    """What a checkpoint must match to be resumed."""
    return sha256_json({"method": method, "train": without_launch(section_values(cfg.train)), "precision": precision,
                        "method_cfg": section_values(method_config(cfg, method)),
                        "features": data.features_key, "prototypes": protos.key, "llm": lm.weights_sha256,
                        "n": len(data.captions)})


@dataclass
class Training:
    """One run's trained state and how it steps. Built once (build_training), resumed from a checkpoint
    (resume), advanced one optimiser step at a time (train_step), saved (save_checkpoint, the bridge).
    The pipeline's loop and the benches step through the same object."""

    method: Method
    bridge: torch.nn.Module
    trained: torch.nn.Module  # the bridge, or its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    tcfg: TrainConfig
    lm: LanguageModel
    prompt_ids: torch.Tensor
    precision: str

    @property
    def ranks(self) -> Ranks:
        return self.method.ranks


def build_training(method: str, cfg: Config, lm: LanguageModel, protos: Prototypes, d_vision: int, steps: int,
                   warmup: int, ranks: Ranks, precision: str) -> Training:
    """A fresh run: the seeded bridge, the method (with its own parameters), AdamW and the lr schedule."""
    tcfg, device = cfg.train, lm.device
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(tcfg.seed)
        bridge = build_bridge("linear", d_vision, lm.hidden_size).to(device)
    built = build_method(method, cfg, protos, ranks).to(device)
    groups = [{"params": list(bridge.parameters())}]
    own = [p for p in built.parameters() if p.requires_grad]
    if own:  # e.g. CLIP's logit scale: trained with the bridge, without weight decay (as in CLIP)
        groups.append({"params": own, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=method_lr(cfg, method), weight_decay=tcfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, tcfg.schedule))
    trained = bridge
    if ranks.world > 1:  # all-reduces (averages) the gradients; every rank starts from rank 0's weights
        trained = torch.nn.parallel.DistributedDataParallel(bridge, device_ids=[device] if device.type == "cuda" else None)
    return Training(built, bridge, trained, optimizer, schedule, tcfg, lm, lm.prompt_ids(tcfg.prompt), precision)


def train_step(run: Training, tokens: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """One optimiser step on this rank's part of a global batch; its logged row (global terms and the lr)."""
    tokens = tokens.to(device=run.lm.device, dtype=torch.float32, non_blocking=True)
    with training_autocast(run.precision, run.lm.device):
        terms = compute_losses(run.method, run.tcfg, run.lm, run.trained, tokens, captions, run.prompt_ids)
    run.optimizer.zero_grad(set_to_none=True)
    # Shares add up to the global loss, and DDP averages gradients over ranks: scale back to the sum.
    (terms["loss"] * run.ranks.world).backward()
    run.optimizer.step()
    run.method.after_optimizer_step()
    row = {k: run.ranks.total(v).item() for k, v in terms.items()} | {"lr": run.schedule.get_last_lr()[0]}
    run.schedule.step()
    return row


def resume(run: Training, checkpoint: Path, fingerprint: str, label: str) -> tuple[int, list[dict]]:
    """(the step to go on from, the logged rows so far): from `checkpoint` when it was left by this run's
    settings, else from step 0."""
    if not checkpoint.exists():
        return 0, []
    state = read_checkpoint(checkpoint, run.lm.device)
    if state["fingerprint"] != fingerprint:
        log.warning("train %s: %s was left by other settings (step %d of another run); starting from step 0, "
                    "it is replaced at the first checkpoint", label, checkpoint, state["step"])
        return 0, []
    run.bridge.load_state_dict(state["bridge"])
    run.method.load_state_dict(state["method"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    log.info("train %s: resuming from step %d", label, state["step"])
    return state["step"], state["history"]


def train_bridge(method: str, cfg: Config, data: TrainData, lm: LanguageModel, protos: Prototypes, out_dir: Path,
                 live_dir: Path, throughput_dir: Path, checkpoint: Path, stop_after: int | None = None,
                 ranks: Ranks = Ranks(), val: ValidationSet | None = None,
                 until: Callable[[list[dict]], bool] | None = None) -> dict:
    """Train one method; write the bridge folder out_dir (model.safetensors, config.json) and dvclive logs
    under live_dir.

    `stop_after` ends the run after that many steps (leaving the checkpoint), as an interruption would.
    With `val`, every `train.validation.every` steps and at the last, rank 0 logs the val/ metrics
    (pipeline/validation.py) into the same curves; `until(history)`, asked after each such point, ends the
    run there when it answers True: the bridge is written as it stands and a checkpoint is left at that step,
    so a later run can go on (`vlap curves` stops at a plateau).
    Under torchrun (`ranks.world` > 1) every process trains on its part of each global batch through
    DDP, and only rank 0 writes.
    """
    precision = resolve_precision(cfg.train.precision, lm.device)
    with lm.attention(training_attention(precision, lm.device)):
        return _train_bridge(method, cfg, data, lm, protos, out_dir, live_dir, throughput_dir, checkpoint, stop_after,
                             ranks, precision, val, until)


def _train_bridge(method: str, cfg: Config, data: TrainData, lm: LanguageModel, protos: Prototypes, out_dir: Path,
                  live_dir: Path, throughput_dir: Path, checkpoint: Path, stop_after: int | None,
                  ranks: Ranks, precision: str, val: ValidationSet | None,
                  until: Callable[[list[dict]], bool] | None = None) -> dict:
    from dvclive import Live

    if until is not None and (ranks.world > 1 or val is None):
        raise ValueError("train_bridge(until=...) needs validation and one process")
    tcfg, device = cfg.train, lm.device
    steps, warmup = run_length(tcfg, len(data.rows))
    check_batch(tcfg.batch_size, len(data.rows), ranks)
    run = build_training(method, cfg, lm, protos, data.d_vision, steps, warmup, ranks, precision)
    fingerprint = run_fingerprint(method, cfg, data, protos, lm, precision)
    start, history = resume(run, checkpoint, fingerprint, method)
    if ranks.is_main:
        log.info("train %s: %s on %s (train.precision: %s)", method, precision, device, tcfg.precision)
        if tcfg.compile and not lm.is_encoder_decoder:
            log.info("train %s: train.compile: the first step compiles the LLM's body (a minute or more on a CPU)",
                     method)
    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None) if ranks.is_main else None
    for row in history if live else []:  # replay logged steps so the curves are whole after a resume
        _log_step(live, row)
    # Throughput goes to its own dvclive folder (throughput_dir, in no DVC output): timing, unlike the losses,
    # differs run to run, and the outputs must stay byte-reproducible. Kept out of history and the bridge too.
    meter = Throughput(device, torch.bfloat16 if precision == "bf16" else torch.float32) if ranks.is_main else None
    timing = (Live(dir=str(throughput_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=start > 0)
              if ranks.is_main else None)
    t0, stopped = time.perf_counter(), False
    batches = StepBatches(data, tcfg.batch_size, tcfg.seed, start, steps, ranks)
    if meter and start < steps:  # this rank's FLOPs of one step, counted on a dry run of the first batch
        # its own reader: the loader's workers must not inherit an open HDF5 file
        _, idx, tokens = StepBatches(data, tcfg.batch_size, tcfg.seed, start, steps, ranks)[0]
        # the bare bridge and a one-process method: no collective runs on rank 0 alone
        local = build_method(method, cfg, protos, Ranks()).to(device)

        def forward_backward() -> None:
            with training_autocast(precision, device):
                dry = compute_losses(local, tcfg, lm, run.bridge, tokens.to(device=device, dtype=torch.float32),
                                     [data.captions[i] for i in idx.tolist()], run.prompt_ids)
            dry["loss"].backward()

        meter.count(forward_backward)
        run.optimizer.zero_grad(set_to_none=True)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=tcfg.loader_workers,
                                         prefetch_factor=2 if tcfg.loader_workers else None,
                                         pin_memory=device.type == "cuda")
    bar = tqdm(loader, initial=start, total=steps, desc=f"train {method}", unit="step", disable=not ranks.is_main)
    # train.compile: entered after the FLOP-counting dry run, whose module hooks must not be traced into the graph
    with lm.compiled(tcfg.compile):
        for step, idx, tokens in bar:
            if stop_after is not None and step >= start + stop_after:
                break
            if meter:
                meter.start()
            row = train_step(run, tokens, [data.captions[i] for i in idx.tolist()])
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if not ranks.is_main:
                continue
            for key, value in meter.row(tcfg.batch_size).items():
                timing.log_metric(f"throughput/{key}", value)
            every = tcfg.validation.every
            if val is not None and every and ((step + 1) % every == 0 or step + 1 == steps):
                row["val"] = validate(cfg, lm, run.bridge, protos, val, run.prompt_ids)
                timing.log_metric("throughput/val_seconds", row["val"].pop("seconds"))
            timing.next_step()
            _log_step(live, row)
            stop = until is not None and "val" in row and step + 1 < steps and until(history)
            if stop or (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == steps:
                save_checkpoint(checkpoint, fingerprint, step + 1, run, history)
            if stop:
                log.info("train %s: stopped at step %d (until)", method, step + 1)
                stopped = True
                break
    steps_done = len(history)
    if not ranks.is_main:
        return {"finished": steps_done >= steps, "steps": steps_done}
    throughput = meter.means()
    if throughput:
        timing.summary["throughput"] = throughput
        log.info("train %s: %.3f s/step, %.1f samples/s, MFU %.1f%% (%.1f GFLOP/step, %s peak %.0f GFLOP/s)", method,
                 throughput["mean_step_seconds"], throughput["mean_samples_per_second"], 100 * throughput["mean_mfu"],
                 throughput["step_gflop"], precision, throughput["peak_gflop_per_second"])
    live.end()
    timing.end()
    if steps_done < steps and not stopped:
        return {"finished": False, "steps": steps_done, "throughput": throughput}
    config = {"bridge": "linear", "d_vision": data.d_vision, "d_model": lm.hidden_size, "method": method,
              "llm": cfg.prototypes.llm, "encoder": data.encoder, "prompt": tcfg.prompt,
              "feature_shape": [data.n_tokens, data.d_vision], "feature_dtype": data.feature_dtype,
              "features_key": data.features_key, "encoder_weights_sha256": data.encoder_weights_sha256,
              "prototypes_key": protos.key, "train": without_launch(section_values(tcfg)), "precision": precision,
              "method_config": section_values(method_config(cfg, method)), "samples": len(data.captions),
              "steps": steps_done, "warmup_steps": warmup, "processes": ranks.world, "final": history[-1]}
    if stopped:  # the bridge where `until` ended the run; its checkpoint stays, so the run can go on
        config["stopped_by_until_of"] = steps
    save_bridge(out_dir, run.bridge.cpu(), config)
    if not stopped:
        checkpoint.unlink(missing_ok=True)
    return {"finished": not stopped, "stopped": stopped, "steps": steps_done, "seconds": time.perf_counter() - t0,
            "final": history[-1], "throughput": throughput}


def _log_step(live, row: dict) -> None:
    for key, value in row.items():
        if key == "val":
            for name, v in value.items():
                live.log_metric(f"val/{name}", v)
        else:
            live.log_metric(f"train/{key}", value)
    live.next_step()


CHECKPOINT_FORMAT = 1  # safetensors: every tensor; its metadata: one JSON document with everything else


def checkpoint_file(models: Path, method: str) -> Path:
    """Where a method's resume checkpoint lives (under the models folder, in no DVC output)."""
    return models / "checkpoints" / f"{method}.safetensors"


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """A resume checkpoint: tensors from safetensors, the rest from its JSON metadata; no pickle is read, so
    a file from anywhere cannot run code. A damaged one is one line naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {})["vlap_checkpoint"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")

        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        state = {int(i): dict(values) for i, values in meta["optimizer_scalars"].items()}
        for key, value in part("optimizer.state.").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        return {"fingerprint": meta["fingerprint"], "step": meta["step"], "history": meta["history"],
                "schedule": meta["schedule"], "bridge": part("bridge."), "method": part("method."),
                "optimizer": {"state": state, "param_groups": meta["optimizer_param_groups"]}}
    except Exception as err:  # not safetensors, truncated, no or other metadata: all mean unusable
        raise CacheError(f"{path}: unreadable resume checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         f"delete it to train from step 0") from None


def save_checkpoint(path: Path, fingerprint: str, step: int, run: Training, history: list[dict]) -> None:
    """The run's whole state at `step`: the bridge's, the method's and the optimiser's tensors in safetensors,
    the optimiser's settings and scalars, the lr schedule's state, the logged rows and the fingerprint in
    its metadata. Serialised in memory, then written atomically by Python: a full disk is then an OSError
    that names the file."""
    from safetensors.torch import save

    optimizer = run.optimizer.state_dict()
    tensors = {f"bridge.{k}": v for k, v in run.bridge.state_dict().items()}
    tensors |= {f"method.{k}": v for k, v in run.method.state_dict().items()}
    scalars: dict[str, dict] = {}
    for index, values in optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": step, "history": history,
            "schedule": run.schedule.state_dict(), "optimizer_param_groups": optimizer["param_groups"],
            "optimizer_scalars": scalars}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"vlap_checkpoint": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
