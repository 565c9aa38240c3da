"""The digest table: a file is hashed once per (size, mtime); the table is parsed again when another process
changed it, and a file changed since it was hashed is hashed again."""
from __future__ import annotations

import hashlib
import json
import os

from pipeline.digests import file_digests, tree_digest


def test_digests_follow_the_files_and_the_table_others_write(tmp_path):
    table, a, b = tmp_path / "digests.json", tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    assert file_digests([a, b], table) == [hashlib.sha256(x).hexdigest() for x in (b"first", b"second")]
    assert set(json.loads(table.read_text())) == {str(a.resolve()), str(b.resolve())}
    a.write_bytes(b"FIRST")  # same size, new content and mtime: hashed again
    assert file_digests([a], table) == [hashlib.sha256(b"FIRST").hexdigest()]
    # another process records b under b's current stamp: this process reads the table it wrote
    known = json.loads(table.read_text())
    known[str(b.resolve())]["sha256"] = "written by another process"
    table.write_text(json.dumps(known))
    os.utime(table, ns=(1, 1))  # a stamp this process has not seen
    assert file_digests([b], table) == ["written by another process"]
    assert tree_digest(tmp_path / "missing", table) == "missing"


def test_a_stage_runs_inputs_digest_reads_no_input_and_follows_rewrites(tmp_path):
    """What run_stage compares two runs by: in a new copy of a data folder (a queued experiment's workspace)
    it reads no file to hash it, and a rewritten input changes it."""
    import shutil

    from pipeline.config import Config
    from pipeline.digests import HASHED
    from pipeline.paths import Dirs
    from stages import evaluate_caption
    from stages.common import whole_config_and_deps_digest

    dirs = Dirs.under(tmp_path / "data")
    for dep in evaluate_caption.STAGE.dep_paths(dirs, "vlap"):
        dep.parent.mkdir(parents=True, exist_ok=True)
        (dep if dep.suffix else dep / "part.bin").parent.mkdir(parents=True, exist_ok=True)
        (dep if dep.suffix else dep / "part.bin").write_bytes(os.urandom(1 << 20))
    copy = Dirs.under(tmp_path / "copy" / "data")
    shutil.copytree(dirs.root, copy.root, copy_function=shutil.copy2)  # same names, sizes and mtimes
    read_before = dict(HASHED)
    first = whole_config_and_deps_digest(evaluate_caption.STAGE, "vlap", Config(), dirs)
    assert whole_config_and_deps_digest(evaluate_caption.STAGE, "vlap", Config(), copy) == first
    assert HASHED == read_before  # not one byte read
    (dirs.features / "part.bin").write_bytes(os.urandom(1 << 20))
    assert whole_config_and_deps_digest(evaluate_caption.STAGE, "vlap", Config(), dirs) != first
