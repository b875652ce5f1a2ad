"""Graceful shutdown, proven on the real processes: SIGTERM mid-load, nothing lost.

Each test starts ``gengui`` subprocesses against the suite's Postgres and Redis, puts
load on them, sends SIGTERM to one process, checks it exits 0 within a generous bound,
then starts a replacement and checks every generation ends as it should: completed
with exactly one image, under the attempt it started with, and never acted on twice.
What a test reads from Postgres it reads directly (the source of truth); images are
counted on disk.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from core.keys import Keys
from core.streams import SharedRedis
from tests.conftest import Servers, truncate_all
from tests.e2e.test_processes import Procs, base_env, free_port, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

# Bounds far above normal (a clean stop takes well under a second here): they only
# turn a hang into a failure.
EXIT_WITHIN_S = 25.0
SETTLE_WITHIN_S = 25.0


@pytest.fixture
def stack(tmp_path: Path, servers: Servers) -> Iterator[Procs]:
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Procs(base_env(tmp_path, port), logs)
    p.env.update(
        _PORT=str(port),
        GENGUI_DATABASE_URL=servers.database_url,
        GENGUI_REDIS_URL=servers.redis_url,
        # Hundreds of generations from one user: per-user limits off.
        GENGUI_MAX_ACTIVE_GENERATIONS="0",
        GENGUI_PLAN_QUOTAS="{}",
        # A stopped consumer's pending entries are reclaimed by its successor soon.
        GENGUI_RECLAIM_IDLE_MS="2000",
        GENGUI_RECLAIM_INTERVAL_S="0.5",
        GENGUI_CONSUMER_BLOCK_MS="200",
    )
    yield p
    p.terminate_all(5)
    p.drop_streams()


@pytest.fixture(autouse=True)
async def _empty_database(pool: asyncpg.Pool) -> None:
    # The reconciler scans every row: rows of earlier tests must not be in its way.
    await truncate_all(pool)


def base_url(procs: Procs) -> str:
    return f"http://127.0.0.1:{procs.env['_PORT']}"


def keys(procs: Procs) -> Keys:
    return Keys(procs.env["GENGUI_STREAM_PREFIX"])


def consumer_id(role: str, proc: subprocess.Popen[bytes]) -> str:
    """The name ``core.runtime.consumer_name`` gives this process."""
    return f"{role}-{socket.gethostname()}-{proc.pid}"


def create_user(procs: Procs) -> tuple[uuid.UUID, str]:
    """``gengui users create``: (user id, API token)."""
    out = procs.run("users", "create", f"{uuid.uuid4().hex[:10]}@example.com").strip()
    head, token = out.splitlines()[0], out.splitlines()[-1]
    return uuid.UUID(head.split("(", 1)[1].split(")", 1)[0]), token


async def stop(procs: Procs, name: str, timeout_s: float = EXIT_WITHIN_S) -> int | None:
    """SIGTERM one process; its exit code, or None when it did not exit in time."""
    proc = procs.procs[name]
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


async def post_generation(
    http: aiohttp.ClientSession, base: str, token: str, prompt: str, size: int = 256
) -> str:
    async with http.post(
        f"{base}/api/v1/generations",
        json={"prompt": prompt, "width": size, "height": size},
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["id"])


async def submit(base: str, token: str, n: int, *, size: int = 256) -> list[str]:
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as http:
        return list(
            await asyncio.gather(
                *(post_generation(http, base, token, f"shutdown {i}", size) for i in range(n))
            )
        )


async def rows(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT id, status, attempt, image_key, thumbnail_key FROM generations"
            " WHERE user_id = $1",
            user_id,
        )
    )


async def count_status(pool: asyncpg.Pool, user_id: uuid.UUID, status: str) -> int:
    n = await pool.fetchval(
        "SELECT count(*) FROM generations WHERE user_id = $1 AND status = $2", user_id, status
    )
    return int(n)


async def wait_until(
    pool: asyncpg.Pool, user_id: uuid.UUID, status: str, at_least: int, timeout_s: float
) -> None:
    async with asyncio.timeout(timeout_s):
        while await count_status(pool, user_id, status) < at_least:
            await asyncio.sleep(0.02)


async def wait_all_completed(
    pool: asyncpg.Pool, user_id: uuid.UUID, n: int, timeout_s: float = SETTLE_WITHIN_S
) -> list[asyncpg.Record]:
    """Every one of the user's ``n`` generations completed with its thumbnail."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = await rows(pool, user_id)
            bad = [r for r in found if r["status"] in ("failed", "cancelled")]
            assert not bad, bad
            done = [r for r in found if r["status"] == "completed" and r["thumbnail_key"]]
            if len(found) == n and len(done) == n:
                return found
            await asyncio.sleep(0.1)


async def events(pool: asyncpg.Pool, user_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            """SELECT e.generation_id, e.attempt, e.status, e.detail->>'source' AS source
                 FROM generation_events e JOIN generations g ON g.id = e.generation_id
                WHERE g.user_id = $1 ORDER BY e.id""",
            user_id,
        )
    )


def originals(procs: Procs, user_id: uuid.UUID, generation_id: uuid.UUID) -> list[Path]:
    root = Path(procs.env["GENGUI_DATA_DIR"]) / "images" / "users" / str(user_id)
    return sorted((root / "generations" / str(generation_id)).glob("*original.*"))


def assert_one_image_each(procs: Procs, user_id: uuid.UUID, found: list[Any]) -> None:
    for row in found:
        images = originals(procs, user_id, row["id"])
        assert len(images) == 1, (row["id"], images)
        assert images[0].name.startswith(f"{row['attempt']}-")
        assert row["image_key"].endswith(f"/{images[0].name}")


def completed_once(evs: list[asyncpg.Record]) -> dict[uuid.UUID, asyncpg.Record]:
    """The completed event of each generation, checking there is exactly one."""
    completed: dict[uuid.UUID, asyncpg.Record] = {}
    for e in evs:
        if e["status"] == "completed":
            assert e["generation_id"] not in completed, f"completed twice: {e['generation_id']}"
            completed[e["generation_id"]] = e
    return completed


async def start(procs: Procs, *commands: tuple[str, ...]) -> tuple[uuid.UUID, str]:
    """Start ``commands`` (name, *args) and make a user while they boot (the suite's
    database is migrated already); returns once the API answers /readyz."""
    for name, *args in commands:
        procs.start(name, *args)
    user = asyncio.create_task(asyncio.to_thread(create_user, procs))
    await wait_ready(base_url(procs))
    return await user


def fail_with_logs(procs: Procs) -> None:
    print(procs.tail())


async def test_api_sigterm_answers_or_refuses_every_request_and_ends_event_streams(
    stack: Procs, pool: asyncpg.Pool
) -> None:
    """In-flight POSTs get a whole 202 (and their row) or a connection error; the SSE
    client's stream ends; exit 0. A restarted stack completes every accepted row."""
    base = base_url(stack)
    try:
        user_id, token = await start(
            stack, ("api", "api"), ("consumers", "consumers"), ("worker", "worker")
        )
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            sse = await http.get(f"{base}/api/v1/events", headers=auth)
            assert sse.status == 200 and sse.content_type == "text/event-stream"
            some_answered = asyncio.Event()

            async def one(i: int) -> str | BaseException:
                # A burst that is in flight at the SIGTERM, then a trickle that arrives
                # after it; each on its own connection, so a refusal fails only itself.
                await asyncio.sleep(max(0, i - 30) * 0.05)
                try:
                    async with aiohttp.ClientSession() as own:
                        gid = await post_generation(own, base, token, f"in flight {i}")
                except aiohttp.ClientError as exc:
                    return exc
                some_answered.set()
                return gid

            posts = [asyncio.create_task(one(i)) for i in range(50)]
            async with asyncio.timeout(SETTLE_WITHIN_S):
                await some_answered.wait()
            stack.procs["api"].send_signal(signal.SIGTERM)
            results = await asyncio.gather(*posts)

            async def drain() -> bytes:
                return await sse.content.read()  # to EOF: the server ended the stream

            async with asyncio.timeout(EXIT_WITHIN_S):
                tail = await drain()
            assert sse.content.at_eof(), tail
            sse.release()
        code = await asyncio.to_thread(stack.procs["api"].wait, EXIT_WITHIN_S)
        assert code == 0

        accepted = {r for r in results if isinstance(r, str)}
        refused = [r for r in results if not isinstance(r, str)]
        assert len(accepted) + len(refused) == 50
        assert accepted, "no request was answered before the shutdown"
        found = await rows(pool, user_id)
        ids = {str(r["id"]) for r in found}
        # Every 202 has its row; a refused request made at most one whole row: the
        # row and its first history entry (submitted: the API sends a local job
        # itself), written in one statement.
        assert accepted <= ids
        assert len(ids) <= 50
        submitted = {
            str(e["generation_id"])
            for e in await events(pool, user_id)
            if (e["status"], e["attempt"]) == ("submitted", 1)
        }
        assert submitted == ids

        # A restarted API (and a reconciler, for any row committed but never sent)
        # takes the stack on: every row that exists completes, with one image, under
        # its first attempt: the stopping API sent every committed row's job.
        stack.start("api2", "api")
        stack.env["GENGUI_DISPATCH_GRACE_S"] = "1"
        stack.start("reconciler", "reconciler")
        await wait_ready(base)
        done = await wait_all_completed(pool, user_id, len(ids))
        assert_one_image_each(stack, user_id, done)
        assert all(r["attempt"] == 1 for r in done)
    except BaseException:
        fail_with_logs(stack)
        raise


async def test_consumers_sigterm_mid_load_loses_nothing(stack: Procs, pool: asyncpg.Pool) -> None:
    """200 generations; consumers stopped mid-way and replaced: all complete, once."""
    n = 200
    base = base_url(stack)
    try:
        user_id, token = await start(
            stack, ("api", "api"), ("consumers", "consumers"), ("worker", "worker")
        )
        submitting = asyncio.create_task(submit(base, token, n))
        await wait_until(pool, user_id, "completed", 10, SETTLE_WITHIN_S)
        code = await stop(stack, "consumers")
        assert code == 0
        stack.start("consumers2", "consumers")
        ids = await submitting
        assert len(set(ids)) == n
        done = await wait_all_completed(pool, user_id, n)
        assert_one_image_each(stack, user_id, done)
        assert all(r["attempt"] == 1 for r in done)
        assert set(completed_once(await events(pool, user_id))) == {r["id"] for r in done}
    except BaseException:
        fail_with_logs(stack)
        raise


# ``gengui worker`` whose engine takes E2E_ENGINE_DELAY_S per image, standing in for a
# GPU: a job is then surely in hand when the SIGTERM comes. Everything else is the real
# process (CLI, signal handlers, stream consumer, heartbeat).
_SLOW_WORKER = """
import os, sys, time
from providers.local import engines
render = engines.PlaceholderEngine.generate
def slow(self, job, progress):
    time.sleep(float(os.environ["E2E_ENGINE_DELAY_S"]))
    return render(self, job, progress)
engines.PlaceholderEngine.generate = slow
from core.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def start_slow_worker(procs: Procs, name: str, delay_s: float) -> subprocess.Popen[bytes]:
    out = open(procs.logs / f"{name}.log", "wb")  # noqa: SIM115  (closed in terminate_all)
    procs.files.append(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WORKER, "worker"],
        env={**procs.env, "E2E_ENGINE_DELAY_S": str(delay_s)},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    procs.procs[name] = proc
    return proc


async def processing_by(pool: asyncpg.Pool, user_id: uuid.UUID, source: str) -> set[uuid.UUID]:
    """Generations now processing whose processing report came from ``source``."""
    found = await pool.fetch(
        """SELECT g.id FROM generations g JOIN generation_events e
                ON e.generation_id = g.id AND e.attempt = g.attempt AND e.status = 'processing'
            WHERE g.user_id = $1 AND g.status = 'processing' AND e.detail->>'source' = $2""",
        user_id,
        source,
    )
    return {r["id"] for r in found}


async def stop_mid_job(
    stack: Procs, pool: asyncpg.Pool, user_id: uuid.UUID, name: str, at_least: int = 1
) -> tuple[str, set[uuid.UUID]]:
    """Wait until worker ``name`` has ``at_least`` jobs in hand, SIGTERM it, check it
    exits 0; returns its consumer name and the jobs that were in hand."""
    worker = consumer_id("worker", stack.procs[name])
    async with asyncio.timeout(SETTLE_WITHIN_S):
        while len(in_hand := await processing_by(pool, user_id, worker)) < at_least:
            await asyncio.sleep(0.02)
    assert await stop(stack, name) == 0
    return worker, in_hand


# (jobs one worker runs at once, jobs in hand at the SIGTERM): with 4, the stop waits
# until two are in hand at once (a read finds only what was queued by then).
@pytest.mark.parametrize(("concurrency", "in_hand_at_stop"), [(1, 1), (4, 2)])
async def test_worker_sigterm_finishes_the_job_in_hand_and_leaves_the_rest(
    stack: Procs, pool: asyncpg.Pool, concurrency: int, in_hand_at_stop: int
) -> None:
    """A worker stopped mid-job completes the jobs in hand under their attempt and exits
    0; the jobs it had not started are run by the next worker; one image each."""
    n = 6
    stack.env["GENGUI_WORKER_CONCURRENCY"] = str(concurrency)
    try:
        start_slow_worker(stack, "worker", delay_s=2.0)
        user_id, token = await start(stack, ("api", "api"), ("consumers", "consumers"))
        await submit(base_url(stack), token, n)
        first, in_hand = await stop_mid_job(stack, pool, user_id, "worker", in_hand_at_stop)
        second = consumer_id("worker", stack.start("worker2", "worker"))
        done = await wait_all_completed(pool, user_id, n)
        assert_one_image_each(stack, user_id, done)
        assert all(r["attempt"] == 1 for r in done)

        evs = await events(pool, user_id)
        completed = completed_once(evs)
        # The jobs in hand at SIGTERM were finished by the stopping worker itself.
        assert all(completed[g]["source"] == first for g in in_hand)
        # What it had not started went to the next worker; each job ran on exactly one
        # (a fast job's processing report may lose its race with its completed report
        # in the status consumer's batch, so completions are what is counted).
        finished_by = {g: e["source"] for g, e in completed.items()}
        assert set(finished_by) == {r["id"] for r in done}
        assert set(finished_by.values()) == {first, second}
        started = {(e["generation_id"], e["source"]) for e in evs if e["status"] == "processing"}
        assert all(finished_by[g] == source for g, source in started)
    except BaseException:
        fail_with_logs(stack)
        raise


async def test_reconciler_leaves_the_job_of_a_stopping_worker_alone(
    stack: Procs, pool: asyncpg.Pool
) -> None:
    """A worker finishing its job after SIGTERM is still alive: the reconciler must not
    call its runner gone and start another attempt."""
    stack.env.update(
        GENGUI_LOCAL_CHECK_S="0.5", GENGUI_WORKER_HEARTBEAT_S="0.3", GENGUI_RETRY_BASE_S="60"
    )
    try:
        start_slow_worker(stack, "worker", delay_s=3.0)
        user_id, token = await start(
            stack, ("api", "api"), ("consumers", "consumers"), ("reconciler", "reconciler")
        )
        await submit(base_url(stack), token, 1)
        first, in_hand = await stop_mid_job(stack, pool, user_id, "worker")
        (gid,) = in_hand
        async with asyncio.timeout(SETTLE_WITHIN_S):  # completed, or retried
            while True:
                row = await pool.fetchrow("SELECT * FROM generations WHERE id = $1", gid)
                if row["status"] == "completed" or row["attempt"] > 1:
                    break
                await asyncio.sleep(0.05)
        assert (row["status"], row["attempt"]) == ("completed", 1)
        assert completed_once(await events(pool, user_id))[gid]["source"] == first
    except BaseException:
        fail_with_logs(stack)
        raise


async def test_jobs_finished_while_the_status_consumers_are_down_are_not_run_again(
    stack: Procs, pool: asyncpg.Pool, redis: SharedRedis
) -> None:
    """Workers finish their jobs while no status consumer runs: their reports wait in
    the stream, the workers no longer hold the jobs, and the reconciler keeps looking at
    them as due. It must not start attempt 2 of any: once the status consumers are back
    each completes under attempt 1, with one image."""
    n = 5
    stack.env.update(GENGUI_LOCAL_CHECK_S="0.5", GENGUI_RETRY_BASE_S="60")
    try:
        user_id, token = await start(
            stack, ("api", "api"), ("worker", "worker"), ("reconciler", "reconciler")
        )
        await submit(base_url(stack), token, n)

        async def reported() -> int:
            entries = await redis.xrange(keys(stack).job_status)
            return sum(b'"state":"completed"' in fields[b"__data__"] for _, fields in entries)

        async with asyncio.timeout(SETTLE_WITHIN_S):
            while await reported() < n:
                await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)  # every job due again several times meanwhile
        assert {r["attempt"] for r in await rows(pool, user_id)} == {1}
        stack.start("consumers", "consumers")
        done = await wait_all_completed(pool, user_id, n)
        assert all(r["attempt"] == 1 for r in done)
        assert_one_image_each(stack, user_id, done)
    except BaseException:
        fail_with_logs(stack)
        raise


async def test_reconciler_sigterm_mid_tick_then_restart_recovers_each_row_once(
    stack: Procs, pool: asyncpg.Pool, redis: SharedRedis
) -> None:
    """Stuck rows (submitted to local workers whose queue was lost): a reconciler stopped
    during its ticks exits 0; a restarted one recovers the rest; each row once."""
    n = 1020
    base = base_url(stack)
    stack.env.update(
        # Dispatched local jobs are checked after 1 s; a retried attempt waits 60 s
        # before it is due again, far past this test, so a second action would show.
        GENGUI_LOCAL_CHECK_S="1",
        GENGUI_RETRY_BASE_S="60",
        GENGUI_RETRY_CAP_S="60",
    )
    try:
        user_id, token = await start(
            stack, ("api", "api"), ("dispatch", "consumers", "--only", "dispatch")
        )
        await submit(base, token, n)
        await wait_until(pool, user_id, "submitted", n, SETTLE_WITHIN_S)
        assert await stop(stack, "dispatch") == 0
        # The queue is lost (a Redis restart without persistence): every job is gone.
        await redis.delete(keys(stack).jobs_local)

        async def retried() -> int:
            return int(
                await pool.fetchval(
                    "SELECT count(*) FROM generations WHERE user_id = $1 AND attempt = 2",
                    user_id,
                )
            )

        stack.start("reconciler", "reconciler")
        async with asyncio.timeout(SETTLE_WITHIN_S):
            while await retried() == 0:
                await asyncio.sleep(0.01)
        assert await stop(stack, "reconciler") == 0
        by_first = await retried()
        # It stopped after the tick in hand (at most BATCH = 1000 rows), not at the end.
        assert 0 < by_first < n

        stack.start("reconciler2", "reconciler")
        async with asyncio.timeout(SETTLE_WITHIN_S):
            while await retried() < n:
                await asyncio.sleep(0.05)
        # A few more ticks: any row acted on again would show now.
        await asyncio.sleep(1.5)
        assert await stop(stack, "reconciler2") == 0

        found = await rows(pool, user_id)
        assert len(found) == n
        assert all(r["status"] == "queued" and r["attempt"] == 2 for r in found), [
            dict(r) for r in found if r["attempt"] != 2
        ]
        evs = await events(pool, user_id)
        retries = [e["generation_id"] for e in evs if e["attempt"] == 2]
        assert sorted(retries) == sorted(r["id"] for r in found)  # one event per row
        reasons = await pool.fetch(
            """SELECT DISTINCT e.detail->>'reason' AS reason FROM generation_events e
                 JOIN generations g ON g.id = e.generation_id
                WHERE g.user_id = $1 AND e.attempt = 2""",
            user_id,
        )
        assert [r["reason"] for r in reasons] == ["job_lost"]
    except BaseException:
        fail_with_logs(stack)
        raise
