"""docs/extending.md's worked examples, applied as written to a copy of the repository: a method (VLAP
without the captioning loss) and a data source are each one new file plus one registration line, the
schema and dvc.yaml pick them up, no existing stage's deps change, and the method's steps never run the LLM."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
COPIED = ("pipeline", "stages", "vlap", "params.yaml", "dvc.yaml")
BLOCK = re.compile(r"<!-- (new file|registration|params): (\S+) -->\n```\w*\n(.*?)```", re.S)


def apply_examples(repo: Path) -> None:
    """Each block of the doc as its marker says: a new file, a registration line (replacing the line that
    assigns the same name, or added at the end of the registry's entries), a params section."""
    for kind, target, text in BLOCK.findall(DOC.read_text()):
        if kind == "new file":
            assert not (repo / target).exists()
            (repo / target).write_text(text)
        elif kind == "registration":
            path, line = repo / target, text.rstrip("\n")
            lines = path.read_text().splitlines()
            name = line.split("=")[0].strip() if "=" in line.split("(")[0] else None
            at = [i for i, old in enumerate(lines) if name and old.startswith(f"{name} =")]
            if at:
                lines[at[0]] = line
            else:  # an entry of a registry literal: before the line that closes it
                lines.insert(lines.index(")}"), line)
            path.write_text("\n".join(lines) + "\n")
        else:
            path = repo / "params.yaml"
            lines = path.read_text().splitlines()
            lines[lines.index(f"{target}:") + 1:lines.index(f"{target}:") + 1] = text.rstrip("\n").splitlines()
            path.write_text("\n".join(lines) + "\n")


CHECK = r'''
import json, shutil, sys
from pathlib import Path
import torch
from pipeline.config import load_config
from pipeline.distributed import Ranks
from pipeline.lms import load_lm
from pipeline.prototypes import build_prototypes, load_prototypes
from pipeline.sources.prepare import prepare_splits
from pipeline.train import build_training, train_step
import dataclasses

images, work = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config("params.yaml")
lm = load_lm(cfg.prototypes.llm, torch.device("cpu"))
captions = ["a blue circle", "a red square", "a green triangle", "a teal rectangle"]
path, _ = build_prototypes(lm, captions, captions, cfg.prototypes, work / "prototypes", cfg.train.prompt)
protos = load_prototypes(path)
run = build_training("vlap_ap_only", cfg, lm, protos, 1280, 2, 0, Ranks(), "fp32")
llm_calls = []
lm.model.register_forward_hook(lambda *a: llm_calls.append(1))
before = [p.detach().clone() for p in run.bridge.parameters()]
g = torch.Generator().manual_seed(0)
rows = [train_step(run, torch.randn(4, 49, 1280, generator=g), captions) for _ in range(2)]

prepare = dataclasses.replace(cfg.prepare, source="filenames", folder=str(images), test_fraction=0.5)
splits, report = prepare_splits(prepare)
print(json.dumps({"caption_weight": cfg.methods.vlap_ap_only.caption_weight, "llm_calls": len(llm_calls),
                  "terms": sorted(rows[-1]), "moved": sum(float((p - b).abs().sum()) for p, b in zip(run.bridge.parameters(), before)),
                  "captions": sorted(c for s in splits for r in s.images for c in r.captions),
                  "splits": sorted(s.name for s in splits)}))
'''


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_a_method_and_a_source_are_one_file_and_one_line_each(tmp_path, easyvqa_root):
    repo = tmp_path / "repo"
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, repo / name))
    env = {"PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo),
           "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "stages.graph"], cwd=repo, env=env, check=True)  # as committed
    original = tree(repo)
    apply_examples(repo)
    subprocess.run([sys.executable, "-m", "stages.graph"], cwd=repo, env=env, check=True)

    changed = tree(repo)
    added = sorted(set(changed) - set(original))
    edited = sorted(k for k in original if changed[k] != original[k])
    assert added == ["pipeline/methods/vlap_ap_only.py", "pipeline/sources/filenames.py"]
    code_edits = [k for k in edited if k.endswith(".py")]
    assert code_edits == ["pipeline/methods/__init__.py", "pipeline/sources/__init__.py"]
    assert sorted(set(edited) - set(code_edits)) == ["dvc.yaml", "params.yaml"]  # dvc.yaml is generated
    for path in code_edits:  # one line each
        old, new = original[path].decode().splitlines(), changed[path].decode().splitlines()
        assert len(set(new) - set(old)) == 1 and len(set(old) - set(new)) <= 1

    # dvc.yaml: a new instance of each per-method stage; the stages that read sources gain the new reader
    # (prepare re-runs, and writes the same bytes); no other stage's deps, params or outs change
    before, after = (yaml.safe_load(t)["stages"] for t in (original["dvc.yaml"], changed["dvc.yaml"]))
    assert before.keys() == after.keys()
    for name, stage in before.items():
        if "pipeline/sources/prepare.py" in stage.get("deps", []):
            assert sorted(after[name]["deps"]) == sorted(stage["deps"] + ["pipeline/sources/filenames.py"])
            assert {k: v for k, v in after[name].items() if k != "deps"} == {
                k: v for k, v in stage.items() if k != "deps"}
        elif "foreach" in stage:
            assert after[name]["foreach"] == stage["foreach"] + ["vlap_ap_only"]
            assert after[name]["do"] == stage["do"], name
        else:
            assert after[name] == stage, name
    assert "pipeline/methods/${item}.py" in after["train"]["do"]["deps"]

    images = tmp_path / "images"
    images.mkdir()
    for i, src in enumerate(sorted(easyvqa_root.rglob("*.png"))[:6]):
        shutil.copy2(src, images / f"a_shape_number_{i}.png")
    out = subprocess.run([sys.executable, "-c", CHECK, str(images), str(tmp_path / "work")], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["caption_weight"] == 0.0
    assert result["llm_calls"] == 0  # its training steps skip the LLM
    assert "loss_cap" not in result["terms"] and {"loss", "loss_ap", "lr"} <= set(result["terms"])
    assert result["moved"] > 0
    assert result["captions"] == [f"a shape number {i}" for i in range(6)]
    assert set(result["splits"]) <= {"train", "val", "test"} and "train" in result["splits"]
