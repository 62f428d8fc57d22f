"""Count how often each K/V write path runs: ``gqa.write_kv`` (after the norm + rotary
kernel) and ``GQAttention.project_write_kv`` (the kernel writing K/V itself)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from inference.model.attention import GQAttention, gqa


@contextmanager
def counted_kv_writes() -> Iterator[dict[str, int]]:
    """Both paths wrapped for the block; yields ``{"write_kv": n, "fused": n}``, updated live
    (callers may reset the counts between runs)."""
    calls = {"write_kv": 0, "fused": 0}
    write_kv, project_write_kv = gqa.write_kv, GQAttention.project_write_kv

    def counting_write(*args):
        calls["write_kv"] += 1
        return write_kv(*args)

    def counting_project(self, *args):
        calls["fused"] += 1
        return project_write_kv(self, *args)

    with mock.patch.object(gqa, "write_kv", counting_write), \
            mock.patch.object(GQAttention, "project_write_kv", counting_project):
        yield calls
