"""Writing values into params.yaml while keeping its comments and layout, and the `vlap preset` and
`vlap config` commands.

    vlap preset clip-vitb32_opt-1.3b   # write the preset's values into params.yaml
    vlap config                        # print every param as it is resolved

params.yaml holds a value for every key a stage reads: DVC records in dvc.lock exactly what ran,
and `dvc params diff` / `dvc exp show` show it. A preset is a set of values, written in once.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml as pyyaml

from pipeline.config import PRESET_KEYS, PRESETS, Config, load_config, parse_config, plain, read_params_file, value_at
from pipeline.errors import ConfigError, report_user_errors


def parse_assignment(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"{text!r}: expected key=value[,value...], e.g. methods.vlap.ap_weight=0.01,1")
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """params (as loaded from YAML) with each dotted `key=value` set; the value is read as YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, (value, *_) = parse_assignment(item)
        node, *path = raw, *key.split(".")
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: not a params key (no section {part!r})")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"{key}: not a params key")
        node[path[-1]] = pyyaml.safe_load(value)
    return raw


def load_config_with(params: Path, sets: list[str]) -> Config:
    """params.yaml with each `key=value` of `sets` set (`vlap study --set train.batch_size=32`), validated."""
    raw = read_params_file(Path(params)) if sets else None
    return parse_config(with_overrides(raw, sets), source=f"{params} with {', '.join(sets)}") if sets else \
        load_config(params)


def update_params(params: Path, values: dict[str, object]) -> None:
    """Set dotted keys (`train.lr`) in params.yaml, keeping its comments (ruamel round trip); the new
    file must validate before it replaces the old one."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    # nulls stay written as `~`, as params.yaml writes them (ruamel's default is an empty value)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "~"))
    doc = yaml.load(params.read_text())
    for key, value in values.items():
        *sections, name = key.split(".")
        node = doc
        for section in sections:
            node = node[section]
        node[name] = value
    tmp = params.with_name(f".{params.name}.tmp")
    try:
        with tmp.open("w") as f:
            yaml.dump(doc, f)
        load_config(tmp)  # what was written must validate before it replaces params.yaml
        tmp.replace(params)
    finally:
        tmp.unlink(missing_ok=True)


def preset_values(name: str) -> dict[str, object]:
    """Every key a preset sets, with the preset's value (the defaults' where the preset leaves it)."""
    cfg = parse_config({"preset": name})
    return {key: value_at(cfg, key) for key in PRESET_KEYS}


def as_dict(cfg: Config) -> dict:
    """A config as a params file holds it: every value, lists for tuples, no preset name."""
    return {k: v for k, v in plain(cfg).items() if k != "preset"}


def preset_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap preset", description="write a preset's values into params.yaml")
    p.add_argument("name", choices=list(PRESETS))
    p.add_argument("--params", default="params.yaml", type=Path)
    args = p.parse_args(argv)

    def apply() -> int:
        values = preset_values(args.name)
        update_params(args.params, values)
        for key, value in values.items():
            print(f"{key}: {value!r}")
        return 0

    return report_user_errors(apply)


def config_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlap config", description="print every param as params.yaml resolves it")
    p.add_argument("--params", default="params.yaml", type=Path)
    args = p.parse_args(argv)

    def show() -> int:
        print(pyyaml.safe_dump(as_dict(load_config(args.params)), sort_keys=False, width=120), end="")
        return 0

    return report_user_errors(show)
