"""Typed, validated view of params.yaml: the only module that reads it.

Each params section is a frozen pydantic dataclass (unknown keys forbidden, bounds in `Field`), so
the sections are plain dataclasses to the code that reads them. Loading rejects unknown keys, wrong
types and out-of-range values with one line naming the key, e.g.
``params.yaml: train.lr: expected a number > 0, got -1``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigError
from pipeline.methods import NAMES as METHOD_NAMES, method_sections
from pipeline.schema import Bool, Fraction, Int, NonNegative, NonNegativeInt, Positive, PositiveInt, Str, section
from pipeline.sources import SOURCES

PARAMS_FILE = Path("params.yaml")
TEST_SOURCES = tuple(name for name, source in SOURCES.items() if source.test_source)


@section
class PrepareConfig:
    source: Literal[tuple(SOURCES)] = "easyvqa"  # type: ignore[valid-type]
    folder: Str = ""  # every source but easyvqa: the image root (folder: also holds captions.csv / captions.json)
    shards: Str = ""  # webdataset: brace pattern of tar shards under folder, e.g. "{00000..00127}.tar"
    annotations: Str = ""  # karpathy: split JSON; cc3m: caption/URL TSV; nocaps: COCO-style JSON; vqav2: annotations JSON
    questions: Str = ""  # vqav2: the questions JSON matching `annotations`
    test_fraction: Fraction = 0.2  # sources without their own split
    # An evaluation source: its test split replaces the training source's (e.g. train on CC3M, test on NoCaps).
    test_source: Literal[("", *TEST_SOURCES)] = ""  # type: ignore[valid-type]
    test_folder: Str = ""  # test_source's image root
    test_annotations: Str = ""  # test_source's annotations (as `annotations` for that source)
    test_questions: Str = ""  # test_source vqav2: its questions JSON
    # The zero-shot split (easy-VQA): colour-shape combinations kept out of training, e.g. ["blue circle"].
    heldout: tuple[Str, ...] = ()
    # Training images carved out as the validation split (by image hash), which tuning scores on.
    validation_fraction: Fraction = 0.0


@section
class ExtractConfig:
    encoder: Str = "efficientnet-lite0"  # or "hf:<hub id or local folder>"
    batch_size: PositiveInt = 64
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of cached tokens
    device: Str = "auto"  # auto | cpu | cuda | cuda:N
    shard_size: PositiveInt = 256  # images per resumable unit of work
    workers: NonNegativeInt = 0  # 0: inline; N: a local Dask cluster of N processes
    # threads decoding images ahead of the encoder (per Dask worker). 0: in the encoding thread, best where the
    # encoder runs on the CPU (threads compete with it for the cores: bench/extract.py); 4-8 beside a GPU
    decode_workers: NonNegativeInt = 0
    scheduler: Str = ""  # tcp:// or tls://host:port of an existing Dask scheduler (overrides workers)
    # tls:// schedulers: the cluster's CA certificate, and this machine's certificate and key (PEM files)
    tls_ca_file: Str = ""
    tls_cert: Str = ""
    tls_key: Str = ""


@section
class PrototypesConfig:
    llm: Str = "smollm2-135m"  # or "hf:<hub id or local folder>"
    subset: Literal["vocab", "corpus"] = "vocab"  # whole vocabulary, or token ids seen in training captions
    # frequency: mu ∝ df^temperature; released: the authors' softmax(df / sum(df) / temperature); uniform
    prior: Literal["frequency", "released", "uniform"] = "frequency"
    temperature: Positive = 0.25  # frequency: the power of df; released: the softmax temperature
    smoothing: NonNegative = 1e-8  # added to every word's mass
    batch_size: PositiveInt = 64
    device: Str = "auto"


@section
class ValidationConfig:
    """Validation during training (pipeline/validation.py): its own alignment settings, so every method's
    diagnostics are measured alike without a train stage reading another method's params."""
    every: NonNegativeInt = 10  # steps between points (and the last step); 0 = none
    samples: PositiveInt = 64  # the fixed val subset: its first images with features and a caption
    fit_images: PositiveInt = 1000  # training images the fitted retrieval scorers are fitted on
    epsilon: Positive = 0.01  # L_AP and the assignment scorer: Sinkhorn entropy weight (as methods.vlap)
    sinkhorn_iters: PositiveInt = 3
    tau: Positive = 0.01
    nce_temperature: Positive = 0.01  # InfoNCE at logit scale 1 / this (methods.contrastive's initial value)


@section
class TrainConfig:
    max_samples: NonNegativeInt = 0  # training images used; 0 = all
    steps: PositiveInt = 40  # used when epochs is 0
    epochs: NonNegative = 0.0  # > 0: the run's length in passes over the data
    batch_size: PositiveInt = 8  # the global batch (all torchrun ranks together)
    lr: Positive = 1e-2
    weight_decay: NonNegative = 0.01
    warmup_steps: NonNegativeInt = 5  # used when epochs is 0
    warmup_epochs: NonNegative = 0.0  # used when epochs > 0
    # cosine: warm-up, then cosine decay to 0 at the last step; constant: warm-up, then flat (learning curves:
    # a flat end then means the loss stopped improving, not that the learning rate reached 0)
    schedule: Literal["cosine", "constant"] = "cosine"
    prompt: Str = "A picture of"
    max_caption_tokens: PositiveInt = 16
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Bool = False  # torch.compile the frozen LLM's body for training (first step compiles)
    seed: Int = 0
    checkpoint_every: PositiveInt = 10
    loader_workers: NonNegativeInt = 1  # processes reading batches from the cache
    device: Str = "auto"
    # Data-parallel training (pipeline.distributed.LAUNCH_KEYS): more than one process in all runs the stage under
    # torchrun. How many processes train a bridge, not what it is trained on: config.json records "processes".
    nproc_per_node: PositiveInt = 1  # processes per machine (one GPU each where the processes train on GPUs)
    nnodes: PositiveInt = 1  # machines; node 0 runs the stage, the others join (stages.train --node-rank K)
    rdzv_endpoint: Str = ""  # nnodes > 1: host:port on node 0 that the other machines reach
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# methods.<name>: each registered method's own section (pipeline/methods/<name>.py declares it)
_METHOD_SECTIONS = method_sections()
MethodsConfig = section(type("MethodsConfig", (), {"__annotations__": dict(_METHOD_SECTIONS), "__module__": __name__}
                             | {name: field(default_factory=c) for name, c in _METHOD_SECTIONS.items()}))


@section
class EvalCommonConfig:
    test_images: NonNegativeInt = 200  # test images evaluated; 0 = all
    batch_size: PositiveInt = 32
    seed: Int = 0
    device: Str = "auto"
    # > 1: captioning, VQA and retrieval run under torchrun on this many processes of one machine (one GPU each
    # where they run on GPUs), each on its shard of the items; rank 0 writes what one process would
    nproc_per_node: PositiveInt = 1


@section
class CaptionEvalConfig:
    max_new_tokens: PositiveInt = 12
    examples: NonNegativeInt = 16  # rows of the HTML example page


@section
class VqaEvalConfig:
    questions: NonNegativeInt = 64  # test questions (on the evaluated images); 0 = all
    shots: NonNegativeInt = 1  # n of the n-shot setting (0-shot always runs)
    max_new_tokens: PositiveInt = 4  # open-ended answers
    closed_answers: NonNegativeInt = 0  # ranked candidates: N most frequent; 0 = all


@section
class RetrievalEvalConfig:
    epsilon: Positive = 0.01  # the assignment scorer's Sinkhorn settings
    sinkhorn_iters: PositiveInt = 3
    # Training images (and their captions) that the centring means and the assignment scorer's OT
    # potentials are fitted on: nothing of the test set enters a query's score.
    fit_images: PositiveInt = 1000


@section
class ArithmeticEvalConfig:
    queries: NonNegativeInt = 100  # source images per swap kind; 0 = all
    examples: NonNegativeInt = 12


@section
class TaxonomyEvalConfig:
    min_images: PositiveInt = 5  # a label class (a colour, a shape) counts with at least this many test images
    bootstrap: PositiveInt = 1000  # resamples of the images within each class: the RSA interval
    permutations: PositiveInt = 1000  # class words shuffled: the RSA p-value


@section
class EvaluateConfig:
    common: EvalCommonConfig = field(default_factory=EvalCommonConfig)
    caption: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)
    vqa: VqaEvalConfig = field(default_factory=VqaEvalConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    arithmetic: ArithmeticEvalConfig = field(default_factory=ArithmeticEvalConfig)
    taxonomy: TaxonomyEvalConfig = field(default_factory=TaxonomyEvalConfig)


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


@section
class Config:
    preset: Literal[tuple(PRESETS)] = "default"  # type: ignore[valid-type]
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    prototypes: PrototypesConfig = field(default_factory=PrototypesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


METHODS = METHOD_NAMES


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate params.yaml once."""
    path = Path(path)
    raw = read_params_file(path)
    check_resolved(raw, str(path))
    return parse_config(raw, source=str(path))


def read_params_file(path: Path) -> Any:
    """A params file's YAML, with each way it can be unreadable made one line naming it."""
    try:
        raw = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
        return {} if raw is None else raw  # an empty file; anything else not a mapping is refused by parse_config
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a params file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None


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
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
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
    return _build(_merged(PRESETS[preset], given) | {"preset": preset}, source)


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


_CONFIG = TypeAdapter(Config)


def _build(raw: dict, source: str) -> Config:
    try:
        return _CONFIG.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0], source)) from None


def _message(error: dict, source: str) -> str:
    """One line naming the key (`train.lr`, `prepare.heldout[0]`) and what it expects."""
    path = [p for p in error["loc"] if not (isinstance(p, str) and not p.isidentifier())]  # drop union tags
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "top level"
    kind, value = error["type"], error["input"]
    owner, info = _field_at(path)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{source}: {key}: unknown key (expected one of: {', '.join(f.name for f in dataclasses.fields(owner))})"
    if kind in ("dataclass_type", "dataclass_args_type", "dict_type"):
        return f"{source}: {key}: expected a mapping, got {type(value).__name__}"
    if kind == "literal_error":
        allowed = typing.get_args(info.annotation) if info is not None else ()
        return f"{source}: {key}: expected one of {', '.join(map(str, allowed))}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than_equal", "less_than"):
        described = (info.description if info is not None and info.description else
                     next((m.description for m in _metadata(info) if getattr(m, "description", None)), None))
        return f"{source}: {key}: expected {described or error['msg'].lower()}, got {value!r}"
    expected = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                "float_parsing": "a number", "value_error": "a number", "bool_type": "true or false",
                "string_type": "a string", "tuple_type": "a list", "list_type": "a list"}.get(kind, error["msg"].lower())
    return f"{source}: {key}: expected {expected}, got {value!r}"


def _field_at(path: list) -> tuple[type, Any]:
    """(the section that holds the key at `path`, the key's pydantic FieldInfo or None)."""
    owner, info = Config, None
    for part in path:
        if isinstance(part, int) or not dataclasses.is_dataclass(owner):
            break
        info = owner.__pydantic_fields__.get(part)
        if info is None:
            break
        if dataclasses.is_dataclass(info.annotation):
            owner, info = info.annotation, None
    return owner, info


def _metadata(info) -> list:
    """The constraints of a field, also through Optional[...] and Annotated[...]."""
    if info is None:
        return []
    found = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        found += list(getattr(arg, "__metadata__", ()))
        for inner in typing.get_args(arg):
            found += list(getattr(inner, "__metadata__", ()))
    return found


def value_at(cfg: Any, key: str) -> Any:
    """The value of a dotted params key (`train.lr`, or a whole section `methods.vlap`) as a params file
    holds it: plain dicts for sections, lists for tuples. The one resolver of dotted keys."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return plain(node)


def plain(value: Any) -> Any:
    """A config value with sections as dicts and tuples as lists (what YAML and JSON write)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return list(value) if isinstance(value, tuple) else value


def section_values(section: Any) -> dict:
    """A section's fields as a plain dict, subsections as dicts (field by field, so every read is an
    attribute access)."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return {k: section_values(v) if hasattr(v, "__dataclass_fields__") else v for k, v in values.items()}
