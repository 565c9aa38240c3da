"""Training the bridge on cached features: VLAP and the two baselines, one loop.

No image is decoded and no vision encoder runs here: visual tokens come from the
feature cache, z_t from the prototypes cache. The LLM is frozen (eval mode, no
parameter gradients); only the bridge is optimised (AdamW, warm-up then cosine).
Batches are a pure function of (seed, step), so a run resumed from a checkpoint
ends equal to an uninterrupted one.
"""
from __future__ import annotations

import io
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
from pipeline.distributed import Ranks, check_batch
from pipeline.errors import CacheError, DatasetError
from pipeline.io import atomic_path, sha256_json
from pipeline.lms import LanguageModel
from pipeline.losses import LogitScale, captioning_loss
from pipeline.methods import REGISTRY
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

    def __init__(self, data: TrainData, batch_size: int, seed: int, start: int, steps: int, ranks: Ranks = Ranks()):
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


def method_config(cfg: Config, method: str):
    return getattr(cfg.methods, method)


def method_lr(cfg: Config, method: str) -> float:
    """The method's own learning rate (methods.<m>.lr, from tuning), else train.lr."""
    return method_config(cfg, method).lr or cfg.train.lr


def compute_losses(method: str, cfg: Config, lm: LanguageModel, bridge, protos: Prototypes, tokens, captions,
                   prompt_ids, ranks: Ranks = Ranks(), logit_scale: LogitScale | None = None) -> dict[str, torch.Tensor]:
    """All loss terms of this process's part of one global batch; 'loss' is the one to minimise.

    Each term is this rank's share: the shares of all ranks add up to the term of the global batch
    (in one process, the term itself)."""
    mcfg = method_config(cfg, method)
    V = bridge(tokens)  # (b, N, D)
    caption_ids, caption_mask = lm.tokenize_captions(captions, cfg.train.max_caption_tokens, cfg.train.prompt)
    tokens_in_batch = ranks.total(caption_mask.sum())  # the mean is over the global batch's caption tokens
    terms = {"loss_cap": captioning_loss(lm, V, prompt_ids, caption_ids, caption_mask, "sum") / tokens_in_batch}
    loss = mcfg.caption_weight * terms["loss_cap"]
    z_v = visual_representation(V.float())  # (b, D)
    # Cosine scores divided by tau = 0.01 need float32: bf16 keeps ~3 digits.
    with torch.autocast(V.device.type, enabled=False):
        loss = loss + REGISTRY[method].alignment(mcfg, protos, z_v, captions, terms, ranks, logit_scale)
    terms["loss"] = loss
    return terms


def run_fingerprint(method: str, cfg: Config, data: TrainData, protos: Prototypes, lm: LanguageModel,
                    precision: str) -> str:
    """What a checkpoint must match to be resumed."""
    return sha256_json({"method": method, "train": section_values(cfg.train), "precision": precision,
                        "method_cfg": section_values(method_config(cfg, method)),
                        "features": data.features_key, "prototypes": protos.key, "llm": lm.weights_sha256,
                        "n": len(data.captions)})


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
    fingerprint = run_fingerprint(method, cfg, data, protos, lm, precision)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(tcfg.seed)
        bridge = build_bridge("linear", data.d_vision, lm.hidden_size).to(device)
    mcfg = method_config(cfg, method)
    # contrastive: CLIP's logit scale, trained with the bridge (no weight decay on it, as in CLIP)
    learns_scale = REGISTRY[method].learns_logit_scale
    scale = LogitScale(mcfg.temperature, mcfg.learn_temperature).to(device) if learns_scale else None
    groups = [{"params": list(bridge.parameters())}]
    if scale is not None and mcfg.learn_temperature:
        groups.append({"params": [scale.log_scale], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=method_lr(cfg, method), weight_decay=tcfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, tcfg.schedule))
    start, history = 0, []
    if checkpoint.exists():
        state = read_checkpoint(checkpoint, device)
        if state["fingerprint"] == fingerprint:
            bridge.load_state_dict(state["bridge"])
            if scale is not None:
                scale.load_state_dict(state["logit_scale"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            start, history = state["step"], state["history"]
            log.info("train %s: resuming from step %d", method, start)
        else:
            log.warning("train %s: %s was left by other settings (step %d of another run); starting from step 0, "
                        "it is replaced at the first checkpoint", method, checkpoint, state["step"])
    prompt_ids = lm.prompt_ids(tcfg.prompt)
    autocast = training_autocast(precision, device)
    if ranks.is_main:
        log.info("train %s: %s on %s (train.precision: %s)", method, precision, device, tcfg.precision)
        if tcfg.compile and not lm.is_encoder_decoder:
            log.info("train %s: train.compile: the first step compiles the LLM's body (a minute or more on a CPU)",
                     method)
    trained = bridge
    if ranks.world > 1:  # all-reduces (averages) the gradients; every rank starts from rank 0's weights
        trained = torch.nn.parallel.DistributedDataParallel(bridge, device_ids=[device] if device.type == "cuda" else None)
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

        def forward_backward() -> None:
            captions = [data.captions[i] for i in idx.tolist()]
            with autocast:  # the bare bridge and one rank: no collective runs on rank 0 alone
                dry = compute_losses(method, cfg, lm, bridge, protos, tokens.to(device=device, dtype=torch.float32),
                                     captions, prompt_ids, Ranks(), scale)
            dry["loss"].backward()

        meter.count(forward_backward)
        optimizer.zero_grad(set_to_none=True)
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
            tokens = tokens.to(device=device, dtype=torch.float32, non_blocking=True)
            captions = [data.captions[i] for i in idx.tolist()]
            with autocast:
                terms = compute_losses(method, cfg, lm, trained, protos, tokens, captions, prompt_ids, ranks, scale)
            optimizer.zero_grad(set_to_none=True)
            # Shares add up to the global loss, and DDP averages gradients over ranks: scale back to the sum.
            (terms["loss"] * ranks.world).backward()
            optimizer.step()
            if scale is not None:
                scale.clamp_()
            row = {k: ranks.total(v).item() for k, v in terms.items()} | {"lr": schedule.get_last_lr()[0]}
            schedule.step()
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if not ranks.is_main:
                continue
            for key, value in meter.row(tcfg.batch_size).items():
                timing.log_metric(f"throughput/{key}", value)
            every = tcfg.validation.every
            if val is not None and every and ((step + 1) % every == 0 or step + 1 == steps):
                row["val"] = validate(cfg, lm, bridge, protos, val, prompt_ids)
                timing.log_metric("throughput/val_seconds", row["val"].pop("seconds"))
            timing.next_step()
            _log_step(live, row)
            stop = until is not None and "val" in row and step + 1 < steps and until(history)
            if stop or (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == steps:
                _save_checkpoint(checkpoint, fingerprint, step + 1, bridge, optimizer, schedule, history, scale)
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
              "prototypes_key": protos.key, "train": section_values(tcfg), "precision": precision,
              "method_config": section_values(method_config(cfg, method)), "samples": len(data.captions),
              "steps": steps_done, "warmup_steps": warmup, "processes": ranks.world, "final": history[-1]}
    if stopped:  # the bridge where `until` ended the run; its checkpoint stays, so the run can go on
        config["stopped_by_until_of"] = steps
    save_bridge(out_dir, bridge.cpu(), config)
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


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """A resume checkpoint, read as tensors and plain values only (never code); a damaged one is one
    line naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        missing = {"fingerprint", "step", "bridge", "optimizer", "schedule", "history"} - set(state)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        return state
    except Exception as err:  # truncated zip, unpickling refused, missing keys: all mean unusable
        raise CacheError(f"{path}: unreadable resume checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         f"delete it to train from step 0") from None


def _save_checkpoint(path: Path, fingerprint, step, bridge, optimizer, schedule, history, scale=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # serialised in memory, then written by Python: a full disk is then an OSError that
    # names it (torch's own file writer reports only "file write failed")
    torch.save({"fingerprint": fingerprint, "step": step, "bridge": bridge.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": history,
                "logit_scale": scale.state_dict() if scale is not None else None}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
