"""Running several long-lived loops in one process, and stopping them well.

Every loop takes the same stop ``Event``. If one loop dies, the others are stopped
too (a process that silently lost its consumer is worse than one that exits).
Shutdown is bounded: loops get ``grace_s`` to finish in-flight work, then are
cancelled; unacked stream entries stay pending and are reclaimed elsewhere.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from core.logging import get_logger

log = get_logger(__name__)

Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def run_loops(loops: dict[str, Loop], stop: asyncio.Event, *, grace_s: float = 30.0) -> None:
    tasks = {asyncio.create_task(loop(stop), name=name): name for name, loop in loops.items()}
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stopper:
                continue
            if not task.cancelled() and task.exception() is not None:
                log.error("service.loop_died", loop=tasks[task], error=repr(task.exception()))  # type: ignore[index]
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            log.warning("service.loop_cancelled", loop=tasks[task], grace_s=grace_s)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        stopper.cancel()
    failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]
    if failed:
        raise RuntimeError(f"loop {tasks[failed[0]]} failed") from failed[0].exception()


def with_companions(main: Loop, *companions: Loop) -> Loop:
    """``main``, with ``companions`` (a heartbeat) running until ``main`` has *returned*,
    not merely until stop is asked: a worker finishing its job in the grace period must
    still look alive, or the reconciler retries that job under a new attempt. A
    companion that dies stops everything, like any loop."""

    async def run(stop: asyncio.Event) -> None:
        finished = asyncio.Event()
        tasks = [asyncio.create_task(companion(finished)) for companion in companions]

        def died(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                stop.set()

        for task in tasks:
            task.add_done_callback(died)
        try:
            await main(stop)
        finally:
            finished.set()
            # Bounded: a companion stuck on I/O must not hold up a hard stop.
            _, stuck = await asyncio.wait(tasks, timeout=5)
            for task in stuck:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result

    return run


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask every loop to stop; called once, by the CLI."""
    loop = asyncio.get_running_loop()

    def asked(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("service.stopping", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, asked, sig)
