"""Results of thread-pool calls handed back to the event loop, one wakeup for many.

``loop.run_in_executor`` wakes the loop once per call (``call_soon_threadsafe``: a
write to its self-pipe, a callback, a future chained to another). The local worker runs
every job's engine call on a thread, so under load the loop paid that per job. Here a
finished call leaves its result in a queue and wakes the loop only if no wakeup is
pending; the loop then settles every result that is there. On the 2-core VM of
``bench/README.md``, 64 calls in flight: 25 us of CPU per call against 55-71 us with
``run_in_executor``; one at a time, no difference.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from typing import Any, TypeVar

T = TypeVar("T")

_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class Handback:
    """``await handback.run(executor, fn, *args)``: ``fn`` on one of the executor's
    threads, in a copy of the caller's context (as ``asyncio.to_thread``); its result or
    exception comes back to the awaiting coroutine. Cancelling the coroutine does not
    stop the call (as with ``run_in_executor``); a call the executor cancels (shutdown
    with ``cancel_futures``) cancels its coroutine. Bound to the loop of its first
    ``run``: one per event loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: collections.deque[_Done] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup_pending = False
        self.wakeups = 0  # loop callbacks so far (tests)

    def run(self, executor: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = self._loop.create_future()
        context = contextvars.copy_context()

        def call() -> None:
            try:
                outcome: _Done = (future, context.run(fn, *args), None)
            except BaseException as exc:  # handed to the caller, as run_in_executor does
                outcome = (future, None, exc)
            self._hand_back(outcome)

        def cancelled(submitted: ThreadFuture[None]) -> None:
            if submitted.cancelled():  # never ran: the executor shut down
                self._hand_back((future, None, asyncio.CancelledError()))

        executor.submit(call).add_done_callback(cancelled)
        return future

    def _hand_back(self, outcome: _Done) -> None:
        self._done.append(outcome)
        with self._lock:
            if self._wakeup_pending:
                return  # the pending callback settles this one too
            self._wakeup_pending = True
        # RuntimeError: the loop is closed, nobody waits any more.
        with contextlib.suppress(RuntimeError):
            assert self._loop is not None  # bound by the run that made the outcome
            self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        self.wakeups += 1
        with self._lock:
            self._wakeup_pending = False
        # Results appended after the flag was cleared wake the loop again: none is lost.
        while self._done:
            future, result, exc = self._done.popleft()
            if future.done():  # its coroutine was cancelled
                continue
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            elif exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
