"""What every bench does first, in one place: offline models, the repo root as working directory
(params.yaml and data/ are relative to it), and the stages' allocator setting.

    import common  # first project import of a bench script (bench/ is on sys.path when run as a script)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.chdir(ROOT)
if str(ROOT) not in sys.path:  # the project, also when it is not installed
    sys.path.insert(1, str(ROOT))

from pipeline.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the stages do: both paths of a bench run get it
