"""core.fsync.GroupSync: many writers, one syncfs; each covered by a sync that began
after it asked; a failed sync fails its writers."""

from __future__ import annotations

import ctypes
import errno
import itertools
import threading
import time
from pathlib import Path

import pytest

from core.fsync import GroupSync, syncfs_available
from core.storage import LocalStorage


class FakeSyncfs:
    """Records each sync's start and end on one clock of sequence numbers."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.clock = itertools.count()
        self.rounds: list[tuple[int, int]] = []

    def __call__(self, fd: int) -> int:
        start = next(self.clock)
        time.sleep(self.seconds)  # a slow disk
        self.rounds.append((start, next(self.clock)))
        if self.fail:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0


def test_every_writer_is_covered_by_a_sync_that_began_after_it_asked(tmp_path: Path) -> None:
    fake = FakeSyncfs(seconds=0.05)
    group = GroupSync(tmp_path, syncfs=fake)
    start = threading.Barrier(16)
    asked_returned: list[tuple[int, int]] = []

    def writer() -> None:
        start.wait()
        asked = next(fake.clock)
        group.wait()
        asked_returned.append((asked, next(fake.clock)))

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(asked_returned) == 16
    for asked, returned in asked_returned:
        assert any(asked < begun and ended < returned for begun, ended in fake.rounds)
    # Sixteen writers at once share the syncs: one runs, the rest wait for the next.
    assert group.rounds == len(fake.rounds) < 16


def test_a_failed_sync_fails_the_writers_it_covers(tmp_path: Path) -> None:
    group = GroupSync(tmp_path, syncfs=FakeSyncfs(fail=True))
    with pytest.raises(OSError, match="syncfs") as raised:
        group.wait()
    assert raised.value.errno == errno.EIO


def test_an_object_whose_sync_failed_is_not_kept(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, sync="file")
    store._group = GroupSync(tmp_path, syncfs=FakeSyncfs(fail=True))
    with pytest.raises(OSError, match="syncfs"):
        store.write("users/u/generations/g/1/original.png", b"png")
    assert not (tmp_path / "users/u/generations/g/1/original.png").exists()
    assert list((tmp_path / "users/u/generations/g/1").iterdir()) == []  # no temp file either


@pytest.mark.skipif(not syncfs_available(), reason="syncfs is Linux's")
def test_the_real_syncfs_runs(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    assert store._group is not None
    store.write("users/u/generations/g/1/original.png", b"png")
    assert (tmp_path / "users/u/generations/g/1/original.png").read_bytes() == b"png"
    assert store._group.rounds == 1
