"""Atomic writes."""

import os

from flowprobe.io import write_json


def test_atomic_write_gives_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        p = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (p.stat().st_mode & 0o777) == 0o644
