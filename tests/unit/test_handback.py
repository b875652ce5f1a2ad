"""core.handback: thread-pool results back on the loop, one wakeup for many."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.handback import Handback

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_results_exceptions_and_the_callers_context_come_back() -> None:
    handback = Handback()
    with ThreadPoolExecutor(2) as pool:

        def where(n: int) -> tuple[int, str, bool]:
            main = threading.current_thread() is threading.main_thread()
            return n * 2, request_id.get(), main

        request_id.set("r-1")
        assert await handback.run(pool, where, 21) == (42, "r-1", False)

        def fail() -> None:
            raise ValueError("engine broke")

        with pytest.raises(ValueError, match="engine broke"):
            await handback.run(pool, fail)


async def test_calls_that_finish_together_wake_the_loop_once() -> None:
    """64 calls released at once: every result arrives, in far fewer loop callbacks."""
    handback = Handback()
    release = threading.Barrier(64)
    with ThreadPoolExecutor(64) as pool:

        def call(n: int) -> int:
            release.wait(10)  # all 64 finish at the same moment
            return n

        results = await asyncio.gather(*(handback.run(pool, call, n) for n in range(64)))
    assert results == list(range(64))
    assert 1 <= handback.wakeups < 32, handback.wakeups


async def test_a_call_the_executor_drops_cancels_its_caller() -> None:
    handback = Handback()
    pool = ThreadPoolExecutor(1)
    hold = threading.Event()
    running = handback.run(pool, hold.wait, 10)
    queued = handback.run(pool, lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)  # as the worker stops hard
    hold.set()
    assert await running is True
    with pytest.raises(asyncio.CancelledError):
        await queued


async def test_a_cancelled_caller_leaves_the_call_to_finish_and_drops_its_result() -> None:
    handback = Handback()
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        hold = threading.Event()

        def call() -> str:
            hold.wait(10)
            done.set()
            return "late"

        waiting = asyncio.ensure_future(handback.run(pool, call))
        await asyncio.sleep(0)
        waiting.cancel()
        hold.set()
        assert await asyncio.to_thread(done.wait, 10)
        # The next call is still settled normally after the dropped one.
        assert await handback.run(pool, lambda: "next") == "next"
    assert waiting.cancelled()
