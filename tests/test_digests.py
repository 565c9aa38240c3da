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
