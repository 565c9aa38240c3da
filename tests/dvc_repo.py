"""A git + DVC repo holding the project's code, dvc.yaml and a params.yaml the test writes (real `dvc repro`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def make_project(work: Path, params: dict) -> dict:
    """Copy the code and dvc.yaml into `work`, write `params`, commit; returns the environment for dvc."""
    work.mkdir(parents=True)
    for name in ("pipeline", "stages", "vlap", "results"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GIT_AUTHOR_NAME": "t",
                        "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("PYTHONPATH", None)
    sh(["git", "init", "-q"], work, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], work, env)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "project"], work, env)
    return env
