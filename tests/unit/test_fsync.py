"""core.fsync.GroupSync: many writers, one syncfs; each covered by a sync that began
after it asked; a failed sync fails its writers; a writer that stops waiting does not
stop the sync of the others. And the local store's own use of it."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import time
from pathlib import Path

import pytest

from core.fsync import GroupSync, syncfs_available
from core.storage import LocalStorage

KEY = "users/u/generations/g/1-original.png"


class FakeSyncfs:
    """Records each sync's start and end on one clock of sequence numbers."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.clock = itertools.count()
        self.rounds: list[tuple[int, int]] = []

    def __call__(self, fd: int) -> int:
        start = next(self.clock)
        time.sleep(self.seconds)  # a slow disk, on the sync's thread
        self.rounds.append((start, next(self.clock)))
        if self.fail:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0


async def test_every_writer_is_covered_by_a_sync_that_began_after_it_asked(
    tmp_path: Path,
) -> None:
    fake = FakeSyncfs(seconds=0.02)
    group = GroupSync(tmp_path, syncfs=fake)
    asked_returned: list[tuple[int, int]] = []

    async def writer(delay: float) -> None:
        await asyncio.sleep(delay)  # arriving while a sync runs, or between two
        asked = next(fake.clock)
        await group.wait()
        asked_returned.append((asked, next(fake.clock)))

    await asyncio.gather(*(writer(0.003 * (i % 12)) for i in range(48)))
    assert len(asked_returned) == 48
    for asked, returned in asked_returned:
        assert any(asked < begun and ended < returned for begun, ended in fake.rounds)
    # Writers arriving together share the syncs: one runs, the rest wait for the next.
    assert group.rounds == len(fake.rounds) < 12
    # One at a time: each sync began after the previous one ended.
    for (_, ended), (begun, _) in itertools.pairwise(fake.rounds):
        assert ended < begun


async def test_a_failed_sync_fails_the_writers_it_covers(tmp_path: Path) -> None:
    fake = FakeSyncfs(fail=True)
    group = GroupSync(tmp_path, syncfs=fake)
    results = await asyncio.gather(group.wait(), group.wait(), return_exceptions=True)
    for raised in results:
        assert isinstance(raised, OSError) and raised.errno == errno.EIO
    fake.fail = False
    await group.wait()  # the next sync is a new one


async def test_a_writer_that_stops_waiting_does_not_cancel_the_shared_sync(
    tmp_path: Path,
) -> None:
    fake = FakeSyncfs(seconds=0.05)
    group = GroupSync(tmp_path, syncfs=fake)
    first = asyncio.create_task(group.wait())
    await asyncio.sleep(0.01)  # its sync runs: the next two share the one after it
    leaving = asyncio.create_task(group.wait())
    staying = asyncio.create_task(group.wait())
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.gather(first, staying)  # still covered by the round the other one left
    assert leaving.cancelled() and group.rounds == len(fake.rounds) == 2


async def test_an_object_whose_sync_failed_is_not_kept(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, sync="file")
    store._group = GroupSync(tmp_path, syncfs=FakeSyncfs(fail=True))
    with pytest.raises(OSError, match="syncfs"):
        await store.put(KEY, b"png", "image/png")
    assert not (tmp_path / KEY).exists()
    assert list((tmp_path / KEY).parent.iterdir()) == []  # no temp file either


async def test_write_file_is_durable_only_once_awaited(tmp_path: Path) -> None:
    fake = FakeSyncfs()
    store = LocalStorage(tmp_path, sync="file")
    store._group = GroupSync(tmp_path, syncfs=fake)
    path = await asyncio.to_thread(store.write_file, KEY, b"png")
    assert Path(path) == tmp_path / KEY
    assert await asyncio.to_thread(Path(path).read_bytes) == b"png"
    assert fake.rounds == []  # written, not synced: nobody may be told of it yet
    await store.durable(path)
    assert len(fake.rounds) == 1


def test_written_files_read_like_any_other_file(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, sync="file")
    path = store.write_file(KEY, b"x" * 100_000)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644 & ~umask
    assert Path(path).read_bytes() == b"x" * 100_000


def test_a_directory_removed_after_it_was_remembered_is_made_again(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, sync="file")
    store.write_file(KEY, b"one")
    (tmp_path / KEY).unlink()
    (tmp_path / KEY).parent.rmdir()
    store.write_file(KEY, b"two")
    assert (tmp_path / KEY).read_bytes() == b"two"


def test_a_symlink_in_place_of_a_directory_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "users" / "u").mkdir(parents=True)
    outside.mkdir()
    (root / "users" / "u" / "generations").symlink_to(outside, target_is_directory=True)
    store = LocalStorage(root, sync="file")
    with pytest.raises(ValueError, match="escapes the storage root"):
        store.write_file(KEY, b"x")
    assert list(outside.iterdir()) == []
    # A link that stays inside the root is followed, as resolve() did.
    (root / "users" / "v").symlink_to(root / "users" / "u", target_is_directory=True)
    (root / "users" / "u" / "generations").unlink()
    path = store.write_file("users/v/generations/g/1-original.png", b"y")
    assert Path(path) == root / "users/u/generations/g/1-original.png"


@pytest.mark.skipif(not syncfs_available(), reason="syncfs is Linux's")
async def test_the_real_syncfs_runs(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    assert store._group is not None
    await store.put(KEY, b"png", "image/png")
    assert (tmp_path / KEY).read_bytes() == b"png"
    assert store._group.rounds == 1
    await store.close()


def test_a_stale_writer_whose_temp_file_was_cleared_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The winning report of a generation deletes its partial files (discard_partials);
    a writer of an older attempt still renaming then fails, and is not retried."""
    store = LocalStorage(tmp_path, sync="file")
    store.write_file(KEY, b"winner")
    real_replace = os.replace
    cleared: list[str] = []

    def cleared_first(src: str, dst: str) -> None:
        if not cleared:  # once: a second try would find nothing in its way
            cleared.append(src)
            os.unlink(src)  # what discard_partials does to a stale writer's temp file
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cleared_first)
    with pytest.raises(FileNotFoundError):
        store.write_file("users/u/generations/g/2-original.png", b"stale")
    assert cleared  # the rename was reached, and failed
    assert sorted(p.name for p in (tmp_path / KEY).parent.iterdir()) == ["1-original.png"]
