"""Typed, validated view of params.yaml: the only module that reads it.

Each params section maps to a frozen dataclass. Loading rejects unknown keys,
wrong types and out-of-range values with one line naming the key, e.g.
``params.yaml: train.lr: expected a number > 0, got -1``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


# Range checks: field metadata {"check": (predicate, "description")}.
def _positive(kind: type = float):
    return {"check": (lambda v: v > 0, f"{'a number' if kind is float else 'an integer'} > 0")}


def _non_negative():
    return {"check": (lambda v: v >= 0, "a value >= 0")}


def _unit_interval():
    return {"check": (lambda v: 0 <= v <= 1, "a value in [0, 1]")}


@dataclass(frozen=True)
class PrepareConfig:
    source: Literal["easyvqa", "folder", "karpathy", "webdataset"] = "easyvqa"  # + a folder, COCO/Flickr30k, tars
    folder: str = ""  # folder/karpathy/webdataset: the image root (folder: also holds captions.csv / captions.json)
    shards: str = ""  # webdataset: brace pattern of tar shards under folder, e.g. "{00000..00127}.tar"
    annotations: str = ""  # karpathy: the Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json)
    test_fraction: float = field(default=0.2, metadata=_unit_interval())  # folder rows without a split column


@dataclass(frozen=True)
class ExtractConfig:
    encoder: str = "efficientnet-lite0"  # or "hf:<hub id or local folder>"
    batch_size: int = field(default=64, metadata=_positive(int))
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of cached tokens
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    shard_size: int = field(default=256, metadata=_positive(int))  # images per resumable unit of work
    workers: int = field(default=0, metadata=_non_negative())  # 0: inline; N: a local Dask cluster of N processes
    scheduler: str = ""  # tcp://host:port of an existing Dask scheduler (overrides workers)


@dataclass(frozen=True)
class PrototypesConfig:
    llm: str = "smollm2-135m"  # or "hf:<hub id or local folder>"
    subset: Literal["vocab", "corpus"] = "vocab"  # whole vocabulary, or token ids seen in training captions
    prior: Literal["frequency", "uniform"] = "frequency"
    temperature: float = field(default=0.25, metadata=_positive())  # mu ∝ df^temperature
    smoothing: float = field(default=1e-8, metadata=_non_negative())  # added to every word's mass
    batch_size: int = field(default=64, metadata=_positive(int))
    device: str = "auto"


@dataclass(frozen=True)
class TrainConfig:
    max_samples: int = field(default=0, metadata=_non_negative())  # training images used; 0 = all
    steps: int = field(default=60, metadata=_positive(int))
    batch_size: int = field(default=16, metadata=_positive(int))
    lr: float = field(default=1e-2, metadata=_positive())
    weight_decay: float = field(default=0.01, metadata=_non_negative())
    warmup_steps: int = field(default=5, metadata=_non_negative())
    prompt: str = "A picture of"
    max_caption_tokens: int = field(default=16, metadata=_positive(int))
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    checkpoint_every: int = field(default=10, metadata=_positive(int))
    loader_workers: int = field(default=1, metadata=_non_negative())  # processes reading batches from the cache
    device: str = "auto"


@dataclass(frozen=True)
class VlapMethodConfig:
    caption_weight: float = field(default=1.0, metadata=_non_negative())
    ap_weight: float = field(default=0.1, metadata=_non_negative())  # lambda
    epsilon: float = field(default=0.01, metadata=_positive())  # Sinkhorn entropy weight
    sinkhorn_iters: int = field(default=3, metadata=_positive(int))
    tau: float = field(default=0.01, metadata=_positive())  # softmax temperature of p_v, p_t


@dataclass(frozen=True)
class LimberMethodConfig:
    caption_weight: float = field(default=1.0, metadata=_positive())


@dataclass(frozen=True)
class ContrastiveMethodConfig:
    caption_weight: float = field(default=1.0, metadata=_non_negative())
    nce_weight: float = field(default=0.1, metadata=_non_negative())
    temperature: float = field(default=0.07, metadata=_positive())


@dataclass(frozen=True)
class MethodsConfig:
    vlap: VlapMethodConfig = field(default_factory=VlapMethodConfig)
    limber: LimberMethodConfig = field(default_factory=LimberMethodConfig)
    contrastive: ContrastiveMethodConfig = field(default_factory=ContrastiveMethodConfig)


@dataclass(frozen=True)
class EvalCommonConfig:
    test_images: int = field(default=200, metadata=_non_negative())  # test images evaluated; 0 = all
    batch_size: int = field(default=32, metadata=_positive(int))
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class CaptionEvalConfig:
    max_new_tokens: int = field(default=12, metadata=_positive(int))
    examples: int = field(default=16, metadata=_non_negative())  # rows of the HTML example page


@dataclass(frozen=True)
class VqaEvalConfig:
    questions: int = field(default=64, metadata=_non_negative())  # test questions (on the evaluated images); 0 = all
    shots: int = field(default=1, metadata=_non_negative())  # n of the n-shot setting (0-shot always runs)
    max_new_tokens: int = field(default=4, metadata=_positive(int))  # open-ended answers


@dataclass(frozen=True)
class RetrievalEvalConfig:
    assignment_scorer: bool = True  # also rank by similarity of Sinkhorn assignment distributions
    epsilon: float = field(default=0.01, metadata=_positive())  # that scorer's Sinkhorn settings
    sinkhorn_iters: int = field(default=3, metadata=_positive(int))


@dataclass(frozen=True)
class ArithmeticEvalConfig:
    queries: int = field(default=100, metadata=_non_negative())  # source images per swap kind; 0 = all
    examples: int = field(default=12, metadata=_non_negative())


@dataclass(frozen=True)
class EvaluateConfig:
    common: EvalCommonConfig = field(default_factory=EvalCommonConfig)
    caption: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)
    vqa: VqaEvalConfig = field(default_factory=VqaEvalConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    arithmetic: ArithmeticEvalConfig = field(default_factory=ArithmeticEvalConfig)


@dataclass(frozen=True)
class Config:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    prototypes: PrototypesConfig = field(default_factory=PrototypesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


METHODS = tuple(f.name for f in dataclasses.fields(MethodsConfig))


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate params.yaml once."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "params") -> Config:
    return _build(Config, raw, prefix="", source=source)


def _build(cls: type, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{source}: {prefix}{key}: unknown key (expected one of: {', '.join(fields)})"
            )
    values = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, key + ".", source)
            continue
        value = _coerce(raw[name], hint, key, source)
        check = fld.metadata.get("check")
        if check and not check[0](value):
            raise ConfigError(f"{source}: {key}: expected {check[1]}, got {value!r}")
        values[name] = value
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, key, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # YAML reads 1e-8 (no dot) as a string; accept numeric strings of that form.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # programming error


def section_values(section: Any) -> dict:
    """A section's fields as a plain dict (field by field, so every read is an attribute access)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
