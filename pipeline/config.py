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


def _optional_positive():
    return {"check": (lambda v: v is None or v > 0, "a number > 0, or null")}


def _unit_interval():
    return {"check": (lambda v: 0 <= v <= 1, "a value in [0, 1]")}


@dataclass(frozen=True)
class PrepareConfig:
    source: Literal["easyvqa", "folder", "karpathy", "webdataset", "cc3m", "nocaps", "vqav2"] = "easyvqa"
    folder: str = ""  # every source but easyvqa: the image root (folder: also holds captions.csv / captions.json)
    shards: str = ""  # webdataset: brace pattern of tar shards under folder, e.g. "{00000..00127}.tar"
    annotations: str = ""  # karpathy: split JSON; cc3m: caption/URL TSV; nocaps: COCO-style JSON; vqav2: annotations JSON
    questions: str = ""  # vqav2: the questions JSON matching `annotations`
    test_fraction: float = field(default=0.2, metadata=_unit_interval())  # sources without their own split
    # An evaluation source: its test split replaces the training source's (e.g. train on CC3M, test on NoCaps).
    test_source: Literal["", "folder", "karpathy", "nocaps", "vqav2"] = ""
    test_folder: str = ""  # test_source's image root
    test_annotations: str = ""  # test_source's annotations (as `annotations` for that source)
    test_questions: str = ""  # test_source vqav2: its questions JSON
    # The zero-shot split (easy-VQA): colour-shape combinations kept out of training, e.g. ["blue circle"].
    heldout: tuple[str, ...] = ()
    # Training images carved out as the validation split (by image hash), which tuning scores on.
    validation_fraction: float = field(default=0.0, metadata=_unit_interval())


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
    steps: int = field(default=40, metadata=_positive(int))  # used when epochs is 0
    epochs: float = field(default=0.0, metadata=_non_negative())  # > 0: the run's length in passes over the data
    batch_size: int = field(default=8, metadata=_positive(int))  # the global batch (all torchrun ranks together)
    lr: float = field(default=1e-2, metadata=_positive())
    weight_decay: float = field(default=0.01, metadata=_non_negative())
    warmup_steps: int = field(default=5, metadata=_non_negative())  # used when epochs is 0
    warmup_epochs: float = field(default=0.0, metadata=_non_negative())  # used when epochs > 0
    prompt: str = "A picture of"
    max_caption_tokens: int = field(default=16, metadata=_positive(int))
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every: int = field(default=10, metadata=_positive(int))
    loader_workers: int = field(default=1, metadata=_non_negative())  # processes reading batches from the cache
    device: str = "auto"


@dataclass(frozen=True)
class VlapMethodConfig:
    lr: float | None = field(default=None, metadata=_optional_positive())  # null: train.lr (tuning sets it)
    caption_weight: float = field(default=1.0, metadata=_non_negative())
    ap_weight: float = field(default=0.1, metadata=_non_negative())  # lambda
    epsilon: float = field(default=0.01, metadata=_positive())  # Sinkhorn entropy weight
    sinkhorn_iters: int = field(default=3, metadata=_positive(int))
    tau: float = field(default=0.01, metadata=_positive())  # softmax temperature of p_v, p_t


@dataclass(frozen=True)
class LimberMethodConfig:
    lr: float | None = field(default=None, metadata=_optional_positive())  # null: train.lr (tuning sets it)
    caption_weight: float = field(default=1.0, metadata=_positive())


@dataclass(frozen=True)
class ContrastiveMethodConfig:
    lr: float | None = field(default=None, metadata=_optional_positive())  # null: train.lr (tuning sets it)
    caption_weight: float = field(default=1.0, metadata=_non_negative())
    nce_weight: float = field(default=0.1, metadata=_non_negative())
    temperature: float = field(default=0.01, metadata=_positive())  # the initial one when learned (CLIP: 0.07)
    learn_temperature: bool = True  # CLIP's learnable logit scale (init 1 / temperature, at most 100)


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
    closed_answers: int = field(default=0, metadata=_non_negative())  # ranked candidates: N most frequent; 0 = all


@dataclass(frozen=True)
class RetrievalEvalConfig:
    epsilon: float = field(default=0.01, metadata=_positive())  # the assignment scorer's Sinkhorn settings
    sinkhorn_iters: int = field(default=3, metadata=_positive(int))
    # Training images (and their captions) that the centring means and the assignment scorer's OT
    # potentials are fitted on: nothing of the test set enters a query's score.
    fit_images: int = field(default=1000, metadata=_positive(int))


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


# The paper's settings (docs/method.md#presets says which values are the paper's and which ours).
# A preset sets exactly the keys in PRESET_KEYS; "default" is the dataclass defaults (the embedded
# CPU-sized setting). A key given in params.yaml overrides the preset; null means "the preset's".
_PAPER = {
    "prototypes": {"temperature": 0.25},
    "train": {"prompt": "A picture of ", "batch_size": 256, "epochs": 32.0, "warmup_epochs": 3.0,
              "weight_decay": 0.01},
    "methods": {"vlap": {"ap_weight": 0.1, "epsilon": 0.01, "sinkhorn_iters": 3, "tau": 0.01}},
}
_ENCODERS = {"clip-vitb32": "hf:openai/clip-vit-base-patch32", "beit-b16": "hf:microsoft/beit-base-patch16-224-pt22k"}
_LLMS = {"opt-1.3b": ("hf:facebook/opt-1.3b", 1e-4), "t5-base": ("hf:t5-base", 1e-2)}
PRESETS: dict[str, dict] = {"default": {}} | {
    f"{enc}_{llm}": {
        "extract": {"encoder": encoder},
        "prototypes": {"llm": llm_spec, **_PAPER["prototypes"]},
        "train": {**_PAPER["train"], "lr": lr},
        "methods": _PAPER["methods"],
    }
    for enc, encoder in _ENCODERS.items() for llm, (llm_spec, lr) in _LLMS.items()
}
PRESET_KEYS = ("extract.encoder", "prototypes.llm", "prototypes.temperature", "train.prompt", "train.lr",
               "train.weight_decay", "train.batch_size", "train.steps", "train.epochs", "train.warmup_steps",
               "train.warmup_epochs", "methods.vlap.ap_weight", "methods.vlap.epsilon",
               "methods.vlap.sinkhorn_iters", "methods.vlap.tau")


@dataclass(frozen=True)
class Config:
    preset: Literal[tuple(PRESETS)] = "default"  # type: ignore[valid-type]
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
    check_resolved(raw, str(path))
    return parse_config(raw, source=str(path))


def check_resolved(raw: Any, source: str) -> None:
    """A params file holds the value of every key (dvc.lock then records what ran): no preset name to
    resolve later and no null where a preset would fill in."""
    if not isinstance(raw, dict):
        return  # parse_config names the problem
    if "preset" in raw:
        raise ConfigError(f"{source}: preset: a params file holds values, not a preset name; "
                          f"`vlap preset {raw['preset']}` writes that preset's values, then remove this key")
    for key in PRESET_KEYS:
        node = raw
        *sections, name = key.split(".")
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node and node[name] is None:
            raise ConfigError(f"{source}: {key}: null; give a value (`vlap preset NAME` writes a preset's values)")


def parse_config(raw: Any, source: str = "params") -> Config:
    """Validate raw params: the preset's values first, then every key given (non-null) over them."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level: expected a mapping, got {type(raw).__name__}")
    preset = raw.get("preset") or "default"
    if preset not in PRESETS:
        raise ConfigError(f"{source}: preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    given = _without_preset_nulls(raw)
    _check_schedule(given, preset, source)
    return _build(Config, _merged(PRESETS[preset], given) | {"preset": preset}, prefix="", source=source)


def _without_preset_nulls(raw: dict, prefix: str = "") -> dict:
    """`raw` less the preset keys set to null (null = take the preset's value)."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out[key] = _without_preset_nulls(value, f"{prefix}{key}.")
        elif not (value is None and f"{prefix}{key}" in PRESET_KEYS):
            out[key] = value
    return out


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _check_schedule(given: dict, preset: str, source: str) -> None:
    """Steps and epochs are two ways to size a run: epochs > 0 sizes it in epochs (and the steps keys,
    which params.yaml still holds, are not used); a warm-up in epochs needs a run sized in epochs."""
    train = given.get("train") if isinstance(given.get("train"), dict) else {}
    epochs = train.get("epochs", PRESETS[preset].get("train", {}).get("epochs", 0.0))
    if isinstance(epochs, (int, float)) and epochs > 0:
        return
    if train.get("warmup_epochs"):
        raise ConfigError(f"{source}: train.warmup_epochs: needs train.epochs > 0 (the run is sized in steps)")


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
    if origin is tuple:  # tuple[T, ...]: a YAML list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(hint)
        return tuple(_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # programming error


def section_values(section: Any) -> dict:
    """A section's fields as a plain dict (field by field, so every read is an attribute access)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
