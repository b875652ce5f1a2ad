"""Group commit for local writes: many writers, one ``syncfs(2)``.

An object the local store has written must be on disk before anyone is told about it
(a worker's ``completed`` report names it). Made durable one by one, each object costs
its writer two ``fsync`` calls (the file, then its directory) and a journal commit of
its own. Writers that finish at about the same time can share one instead:
``GroupSync.wait`` returns once a ``syncfs`` that *started after the call* has
completed, and that flushes every file, rename and directory of the filesystem written
before it. One writer runs the sync; the others that arrive meanwhile wait for the next
one, which covers all of them. Measured with ``bench/worker_drain.py`` (bench/README.md):
the worker's CPU per stored image 1.52-1.56 -> 1.35-1.44 ms, the machine's busy share
75-78 -> 69-70 % (journal commits run in the kernel's threads, not the worker's).

``syncfs`` is Linux's; elsewhere ``syncfs_available()`` is False and the store falls back to
per-file fsyncs. It flushes everything dirty on the filesystem, other processes' writes
too: on a disk shared with a busy database that is I/O the database would otherwise do
later, at its checkpoint (``GENGUI_STORAGE_SYNC=file`` keeps per-file fsyncs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
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
    """Durability for the writes of many threads on the filesystem holding ``path``."""

    def __init__(self, path: Path, syncfs: SyncFn | None = None) -> None:
        fn = syncfs or _SYNCFS
        if fn is None:
            raise OSError("syncfs is not available here")
        self._syncfs = fn
        self._path = path
        self._fd: int | None = None
        self._cond = threading.Condition()
        self._started = 0  # rounds begun; one runs at a time, so they end in order
        self._finished = 0
        self._running = False
        self._failures: dict[int, OSError] = {}  # round -> its error (recent ones)
        self.rounds = 0  # syncs run, for tests and curiosity

    def wait(self) -> None:
        """Return once everything this thread wrote before the call is on disk; raise
        ``OSError`` if the sync that covers it failed."""
        with self._cond:
            # A round already running may have begun before our writes: the next one
            # is the first that surely covers them.
            target = self._started + 1
            while self._finished < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._run_round()
            error = self._failures.get(target)
        if error is not None:
            raise error

    def _run_round(self) -> None:
        """With the condition held: run one sync, releasing the condition meanwhile."""
        self._running = True
        self._started += 1
        number = self._started
        error: OSError | None = None
        self._cond.release()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY)
            if self._syncfs(self._fd) != 0:
                code = ctypes.get_errno()
                error = OSError(code, f"syncfs: {os.strerror(code)}")
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
            self._running = False
            self._finished = number
            self.rounds += 1
            if error is not None:
                self._failures[number] = error
                for old in [n for n in self._failures if n < number - 1000]:
                    del self._failures[old]
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
