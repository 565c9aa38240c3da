"""One graph: dvc.yaml is generated from the stage specs; every stage reads exactly the params it
declares, writes only its declared outputs, imports only its declared code, and its outputs are
byte-reproducible (run twice in two folders, every out hashed)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import METHODS, Config, parse_config
from pipeline.paths import Dirs
from stages import graph
from graph_runner import run_graph
from tiny_models import save_tiny_clip_vision, save_tiny_opt

REPO = Path(__file__).resolve().parents[1]
# Fields only some sources read (easy-VQA reads none of them).
SOURCE_DEPENDENT = {"prepare.folder", "prepare.annotations", "prepare.shards", "prepare.test_fraction", "prepare.questions", "prepare.test_folder", "prepare.test_annotations", "prepare.test_questions"}
# Written beside the outputs on purpose, in no hashed output: resume state, timings, locks.
NOT_OUTPUTS = ("models/checkpoints", "reports", ".locks")


def leaves(cfg: Config, key: str) -> set[str]:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if not dataclasses.is_dataclass(value):
        return {key}
    return set().union(*(leaves(cfg, f"{key}.{f.name}") for f in dataclasses.fields(value)))


def test_dvc_yaml_is_generated_from_the_specs():
    assert graph.dvc_yaml_text() == (REPO / "dvc.yaml").read_text(), "run: python -m stages.graph"
    check = subprocess.run([sys.executable, "-m", "stages.graph", "--check"], cwd=REPO, capture_output=True)
    assert check.returncode == 0


# A fresh interpreter per module, forked from one that has imported only third-party packages (torch's import
# alone takes seconds): each child imports one module and prints the project files it then holds.
PROBE = """
import json, os, sys
import numpy, torch, h5py, pyarrow, yaml  # third-party only: no project module is loaded before the fork
assert not [n for n in sys.modules if n.split('.')[0] in ('pipeline', 'stages', 'vlap')]
found = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        __import__(module)
        files = sorted(getattr(m, '__file__', '') or '' for n, m in list(sys.modules.items())
                       if n.split('.')[0] in ('pipeline', 'stages', 'vlap'))
        os.write(write, json.dumps(files).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[module] = json.loads(pipe.read())
    assert os.waitpid(pid, 0)[1] == 0, module
print(json.dumps(found))
"""


def loaded_project_files(*modules: str) -> dict[str, set[str]]:
    """For each module: the project files a fresh interpreter loads to import it (empty package __init__ files
    left out)."""
    loaded = json.loads(subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout)
    found = {}
    for module, names in loaded.items():
        files = {Path(f).resolve().relative_to(REPO).as_posix() for f in names if f}
        found[module] = {f for f in files if not (f.endswith("__init__.py") and (REPO / f).stat().st_size == 0)}
    return found


def test_code_deps_are_what_the_stage_imports():
    """A fresh interpreter that imports the stage loads exactly the declared project modules, and the method
    modules the params schema reads the methods' sections from (a method module's code runs only in its own
    train stage, which depends on it)."""
    loaded = loaded_project_files("pipeline.config", *(node.module.__name__ for node in graph.graph()))
    schema = loaded["pipeline.config"] - set(graph.NO_OUTPUT_EFFECT)
    by_methods = {f for m in METHODS for f in graph.code_deps(graph.METHOD_MODULE.format(method=m))}
    assert schema <= by_methods | {graph.METHOD_MODULE.format(method=m) for m in METHODS}, schema - by_methods
    for node in graph.graph():
        files = loaded[node.module.__name__] - set(graph.NO_OUTPUT_EFFECT) - schema
        assert files <= set(node.code), (node.spec.name, files - set(node.code))
        assert "stages/graph.py" not in node.code  # editing one stage's spec re-runs only that stage
    train = next(n for n in graph.graph() if n.spec.name == "train")
    assert train.code_of("limber")[-1] == "pipeline/methods/limber.py"
    assert not any(f.startswith("pipeline/methods/") and f != "pipeline/methods/base.py" for f in train.code)


def test_a_run_record_is_stale_when_an_output_or_a_declared_input_changed(tmp_path):
    """The record the study and the flow keep where there is no dvc.lock: an output missing or changed, a
    declared param or a data dep changed make the run stale; an undeclared param does not."""
    node, cfg = next(n for n in graph.graph() if n.spec.name == "prepare"), Config()
    dirs = Dirs.under(tmp_path / "data")
    record = graph.RunRecord(tmp_path / "record" / graph.RUN_RECORD)
    assert record.outputs_changed(node, None, dirs)  # missing, whatever is recorded
    dirs.prepared.mkdir(parents=True)
    (dirs.prepared / "train.parquet").write_bytes(b"v1")
    (dirs.root / "sources.json").write_text('{"easyvqa": "a"}')
    assert not record.outputs_changed(node, None, dirs) and not record.up_to_date(node, None, cfg, dirs)
    record.record(node, None, cfg, dirs)
    assert record.up_to_date(node, None, cfg, dirs)
    assert record.up_to_date(node, None, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)), dirs)
    split = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, validation_fraction=0.25))
    assert not record.up_to_date(node, None, split, dirs) and not record.outputs_changed(node, None, dirs)
    (dirs.root / "sources.json").write_text('{"easyvqa": "b"}')  # the source data moved
    assert not record.up_to_date(node, None, cfg, dirs) and not record.outputs_changed(node, None, dirs)
    (dirs.root / "sources.json").write_text('{"easyvqa": "a"}')
    (dirs.prepared / "train.parquet").write_bytes(b"edited")
    assert record.outputs_changed(node, None, dirs) and not record.up_to_date(node, None, cfg, dirs)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("models")
    return save_tiny_clip_vision(folder / "clip"), save_tiny_opt(folder / "opt", smollm2.tokenizer)


def tiny_config(models) -> Config:
    clip, opt = models
    return parse_config({
        "extract": {"encoder": f"hf:{clip}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{opt}"},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
        "evaluate": {"common": {"test_images": 12, "batch_size": 4}, "caption": {"max_new_tokens": 3, "examples": 2},
                     "vqa": {"questions": 4, "shots": 1, "max_new_tokens": 2},
                     "arithmetic": {"queries": 3, "examples": 1}},
    })


@pytest.mark.slow
def test_stages_read_declared_params_and_write_declared_outs(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models)
    first = Dirs.under(tmp_path / "a")
    seen = run_graph(cfg, first, record=True)
    nodes = {n.spec.name: n for n in graph.graph()}
    for label, (read, written) in seen.items():
        name, _, method = label.partition("@")
        spec = nodes[name].spec
        declared = set().union(set(), *(leaves(cfg, k) for k in spec.param_keys(method or None)))
        assert read <= declared, f"{label} reads undeclared params {sorted(read - declared)}"
        assert declared - SOURCE_DEPENDENT <= read, f"{label} declares unread params {sorted(declared - read)}"
        outs = [p.relative_to(first.root).as_posix() for p in spec.out_paths(first, method or None)]
        stray = {f for f in written if not any(f == o or f.startswith(o + "/") for o in outs + list(NOT_OUTPUTS))}
        assert not stray, f"{label} wrote undeclared files {sorted(stray)}"
    metrics = (first.metrics / "vqa" / "vlap.json").read_text()
    assert '"applicable": true' in metrics  # the small run exercised every task, VQA included

    for method in METHODS:  # training logs its throughput, in no output
        timing = first.reports / "train" / method
        assert 0 < json.loads((timing / "metrics.json").read_text())["throughput"]["mean_mfu"] < 1
        assert (timing / "plots" / "metrics" / "throughput" / "samples_per_second.tsv").exists()
    # That two runs of the whole graph write the same bytes: test_dvc_repro.py (the flow against dvc repro).


def test_a_stage_process_computes_with_the_pinned_cpu_kernels():
    """Every stage process pins torch's CPU kernels to AVX2 (where the CPU has it) before it computes, so an
    AVX-512 machine trains the same bytes as an AVX2 one."""
    probe = "import stages.train, torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env=env).stdout.strip()
    has_avx2 = "avx2" in Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else False
    assert out == "AVX2" if has_avx2 else out


def test_registries_name_every_method_section_and_every_evaluation_stage():
    from pipeline.config import METHODS
    from pipeline.methods import BASELINES, NAMES, PROPOSED, method_class
    from pipeline.tasks.registry import TASKS

    assert NAMES == METHODS and PROPOSED not in BASELINES and set(BASELINES) | {PROPOSED} == set(METHODS)
    assert all(method_class(name).name == name for name in NAMES)
    evaluations = [n.spec.name for n in graph.graph() if n.spec.name.startswith("evaluate_")]
    assert evaluations == [f"evaluate_{task}" for task in TASKS]
    assert {f"metrics/{task}" for task in TASKS} <= set(next(n for n in graph.graph()
                                                             if n.spec.name == "summarize").spec.deps)


def test_params_yaml_holds_every_field_of_the_schema():
    """pipeline/config.py is out of the stages' code deps (graph.NO_OUTPUT_EFFECT): that is safe only when no
    default written in the schema can reach a stage, i.e. when params.yaml gives every field its value."""
    import dataclasses

    import yaml

    from pipeline.config import Config
    from stages.graph import NO_OUTPUT_EFFECT

    raw = yaml.safe_load((graph.ROOT / "params.yaml").read_text())

    def missing(cls, node: dict, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if prefix == "" and f.name == "preset":
                continue  # a params file holds values, never a preset name (pipeline.config.check_resolved)
            key = f"{prefix}{f.name}"
            if not isinstance(node, dict) or f.name not in node:
                out.append(key)
                continue
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):  # a section: every one of its fields, recursively
                out += missing(type(sub), node[f.name], key + ".")
        return out

    assert missing(Config, raw, "") == []
    assert "pipeline/config.py" in NO_OUTPUT_EFFECT
    assert not any("pipeline/config.py" in n.code for n in graph.graph())
