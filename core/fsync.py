"""Group commit for local writes: many writers, one ``syncfs(2)``.

An object the local store has written must be on disk before anyone is told about it
(a worker's ``completed`` report names it). Made durable one by one, each object costs
its writer two ``fsync`` calls (the file, then its directory) and a journal commit of
its own. Writers that finish at about the same time can share one instead:
``GroupSync.wait`` returns once a ``syncfs`` that *started after the call* has
completed, and that flushes every file, rename and directory of the filesystem written
before it. One sync runs at a time, on a thread; the writers that arrive meanwhile wait
for the next one, which covers all of them.

The writers are coroutines: a file is written on a thread, which returns at once, and
its coroutine then awaits the group's sync. Threads never wait for one another (an
earlier version had each writer's thread block on a condition until its sync was done:
with 16 jobs in hand, a hundred futex calls per image, ``bench/README.md``).

``syncfs`` is Linux's; elsewhere ``syncfs_available()`` is False and the store falls back to
per-file fsyncs. It flushes everything dirty on the filesystem, other processes' writes
too: on a disk shared with a busy database that is I/O the database would otherwise do
later, at its checkpoint (``GENGUI_STORAGE_SYNC=file`` keeps per-file fsyncs).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

SyncFn = Callable[[int], int]  # syncfs(fd) -> 0, or -1 with errno set


def _load_syncfs() -> SyncFn | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


def syncfs_available() -> bool:
    return _SYNCFS is not None


class GroupSync:
    """Durability for the writes of many coroutines on the filesystem holding ``path``."""

    def __init__(self, path: Path, syncfs: SyncFn | None = None) -> None:
        fn = syncfs or _SYNCFS
        if fn is None:
            raise OSError("syncfs is not available here")
        self._syncfs = fn
        self._path = path
        self._fd: int | None = None
        self._running = False
        self._next: asyncio.Future[None] | None = None  # the round after the running one
        self.rounds = 0  # syncs run, for tests and curiosity

    async def wait(self) -> None:
        """Return once everything written before the call is on disk; raise ``OSError``
        if the sync that covers it failed. A caller that stops waiting (cancelled) does
        not cancel the sync the others share."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        round_ = self._next
        if not self._running:
            self._start()
        await asyncio.shield(round_)

    def _start(self) -> None:
        # The round in flight may have begun before the callers of ``_next`` wrote:
        # theirs is the next one, begun only now.
        round_, self._next = self._next, None
        assert round_ is not None
        self._running = True
        sync = asyncio.get_running_loop().run_in_executor(None, self._sync_once)
        sync.add_done_callback(lambda done: self._finished(round_, done))

    def _sync_once(self) -> None:
        """On a thread: one ``syncfs`` of the filesystem."""
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        if self._syncfs(self._fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}")

    def _finished(self, round_: asyncio.Future[None], sync: asyncio.Future[None]) -> None:
        self._running = False
        self.rounds += 1
        error = sync.exception() if not sync.cancelled() else OSError("syncfs was cancelled")
        if not round_.done():
            if error is None:
                round_.set_result(None)
            else:
                round_.set_exception(error)
        if self._next is not None:
            self._start()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
