"""Status consumer drain: how many job-status events one ``gengui consumers --only status``
process applies per second.

    .venv/bin/python bench/status_drain.py                    # 20,000 generations
    .venv/bin/python bench/status_drain.py --n 5000 --set GENGUI_STATUS_BATCH=100
    .venv/bin/python bench/status_drain.py --cprofile         # + where the time goes

Before the consumer starts: ``--n`` generations are inserted as ``submitted`` (local
provider, attempt 1) and the job-status stream is filled with one ``processing`` report
for each, then one ``completed`` report for each (``JobStatus`` messages in the wire
format workers write; 2 x N events). The ``status-processors`` group is created at the
stream's start. Then one consumer process is started and the clock runs from the first
entry it reads (XINFO GROUPS ``entries-read`` > 0) until the group has no lag and
nothing pending; the run then checks that every row is ``completed`` with its history
and that a thumbnail request was queued for each.

Each ``completed`` report does what it does in production: CAS to completed with its
history row, a look for half-written files (a directory walk of the generation's
prefix, here empty), an XADD to the thumbnails stream and a pub/sub notice (nobody
subscribes here). Servers, database and prefix as in ``bench/e2e.py``; results on
stdout and in ``bench/results/status-drain-<ts>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import itertools
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    BenchError,
    CpuMeter,
    Procs,
    calibrate,
    check_settings,
    cpu_percent,
    drop_prefix,
    free_port,
    fresh_database,
    git_info,
    log,
    machine_info,
    print_calibration,
    print_cprofile,
    process_env,
    run_bounded,
    server_versions,
    start_servers,
    summarize_cprofile,
    write_results,
)

from core.events import JobStatus
from core.keys import GROUP_STATUS, Keys
from core.streams import encode

_SUBMITTED = """
    WITH ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width, height,
                                 seed, created_at, updated_at, deadline_at)
        SELECT gen_random_uuid(), $1, 'submitted', 1, 'local',
               'drain #' || i || ': a lighthouse on a cliff at dusk', 256, 256, i,
               now(), now(), now() + interval '2 hours'
          FROM generate_series(1, $2::int) AS i
        RETURNING id
    ), chk AS (
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, now() + interval '1 hour' FROM ins
    )
    SELECT id FROM ins
"""


def reports(ids: Sequence[UUID], user_id: UUID) -> list[dict[Any, Any]]:
    """Stream fields: every ``processing`` report, then every ``completed`` one."""
    out = [
        encode(JobStatus(generation_id=g, attempt=1, state="processing", source="bench-worker"))
        for g in ids
    ]
    out += [
        encode(
            JobStatus(
                generation_id=g,
                attempt=1,
                state="completed",
                image_key=f"users/{user_id}/generations/{g}/1-original.png",
                content_type="image/png",
                source="bench-worker",
            )
        )
        for g in ids
    ]
    return out


async def fill_stream(
    client: aioredis.Redis, stream: str, entries: list[dict[Any, Any]], chunk: int = 2000
) -> None:
    for i in range(0, len(entries), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for fields in entries[i : i + chunk]:
                pipe.xadd(stream, fields)
            await pipe.execute()


async def group_state(client: aioredis.Redis, stream: str) -> dict[str, Any]:
    for g in await client.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP_STATUS:
            return {
                "read": int(g.get("entries-read") or 0),
                "lag": g.get("lag"),
                "pending": int(g["pending"]),
            }
    raise BenchError(f"group {GROUP_STATUS} vanished from {stream}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="generations (events = 2 x N)")
    p.add_argument("--max-s", type=float, default=600.0, help="give up after this long draining")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GENGUI_X=V",
        help="setting for the consumer, e.g. GENGUI_STATUS_BATCH=100",
    )
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="run the consumer under cProfile (slower: compare shares, not rates)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (consumer log)")
    args = p.parse_args(argv)
    check_settings(p, args.set)
    return args


async def run(args: argparse.Namespace) -> int:
    from core.db import asyncpg_dsn

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-drain-"))
    token = secrets.token_hex(4)
    db_name = f"gengui_bench_{token}"
    prefix = f"bench{token}"
    keys = Keys(prefix)
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
    }
    if args.keep:
        log(f"keeping {tmp}")
    else:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    meta["calibration_start"] = calibrate()
    result: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        meta["servers"] = await server_versions(servers)
        database_url = await fresh_database(stack, servers, db_name)
        log(f"database {db_name}, stream prefix {prefix}")
        client = aioredis.Redis.from_url(servers.redis_url)
        stack.push_async_callback(client.aclose)

        stack.push_async_callback(drop_prefix, servers.redis_url, prefix)
        env = process_env(database_url, servers.redis_url, prefix, tmp / "data", free_port())
        env.update(item.split("=", 1) for item in args.set)
        (tmp / "logs").mkdir()
        procs = Procs(env, tmp / "logs")
        meter = CpuMeter(procs, db_name)

        async def stop_procs() -> None:
            meta["exit_codes"] = await asyncio.to_thread(procs.stop)

        stack.push_async_callback(stop_procs)

        out = await asyncio.to_thread(procs.run, "users", "create", f"drain-{token}@example.com")
        email = f"drain-{token}@example.com"
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
        try:
            user_id = await conn.fetchval("SELECT id FROM users WHERE email = $1", email)
            t0 = time.perf_counter()
            ids = [r["id"] for r in await conn.fetch(_SUBMITTED, user_id, args.n, timeout=600)]
            await conn.execute("VACUUM ANALYZE generations", timeout=600)
            meta["load_rows_s"] = round(time.perf_counter() - t0, 2)
        finally:
            await conn.close()
        assert out
        t0 = time.perf_counter()
        stream = keys.job_status
        await client.xgroup_create(stream, GROUP_STATUS, id="0", mkstream=True)
        await fill_stream(client, stream, reports(ids, user_id))
        meta["fill_stream_s"] = round(time.perf_counter() - t0, 2)
        events = 2 * len(ids)
        log(f"{len(ids)} rows submitted, {events} events in {stream}; starting the consumer")

        stats_file = tmp / "consumer.prof"
        if args.cprofile:
            procs.start_profiled("consumer", stats_file, "consumers", "--only", "status")
        else:
            procs.start("consumer", "consumers", "--only", "status")
        try:
            spawned = time.perf_counter()
            # Start: the first read. Polled every 10 ms, so the clock is that coarse.
            while (await group_state(client, stream))["read"] == 0:
                procs.check_alive()
                if time.perf_counter() - spawned > 60:
                    raise BenchError("the consumer read nothing in 60 s")
                await asyncio.sleep(0.01)
            t_start = time.perf_counter()
            cpu_before = meter.snapshot()
            meta["startup_s"] = round(t_start - spawned, 2)
            samples: list[tuple[float, int]] = []
            next_sample = t_start
            while True:
                state = await group_state(client, stream)
                now = time.perf_counter()
                if now >= next_sample:
                    samples.append((round(now - t_start, 2), state["read"]))
                    next_sample = now + 1.0
                if state["lag"] == 0 and state["pending"] == 0:
                    break
                procs.check_alive()
                if now - t_start > args.max_s:
                    raise BenchError(f"not drained after {args.max_s} s: {state}")
                await asyncio.sleep(0.01)
            t_end = time.perf_counter()
            cpu_after = meter.snapshot()
        except BaseException:
            log("run failed; process logs:\n" + procs.tail())
            raise
        wall = t_end - t_start
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
        try:
            statuses = {
                r["status"]: r["n"]
                for r in await conn.fetch(
                    "SELECT status, count(*) AS n FROM generations GROUP BY status"
                )
            }
            history = await conn.fetchval("SELECT count(*) FROM generation_events")
        finally:
            await conn.close()
        thumbnails = await client.xlen(keys.thumbnails)
        dead = await client.xlen(keys.dead)
        # Per-second rates from the samples (read = entries handed to the consumer).
        rates = [
            round((b[1] - a[1]) / (b[0] - a[0]))
            for a, b in itertools.pairwise(samples)
            if b[0] > a[0]
        ]
        # When the group had read half the entries: the processing reports come first.
        half = next((t for t, read in samples if read >= len(ids)), None)
        phases = {}
        if half:
            phases = {
                "processing_events_per_s": round(len(ids) / half, 1),
                "completed_events_per_s": round(len(ids) / max(wall - half, 1e-9), 1),
            }
        result = {
            **phases,
            "generations": len(ids),
            "events": events,
            "wall_s": round(wall, 3),
            "events_per_s": round(events / wall, 1),
            "generations_per_s": round(len(ids) / wall, 1),
            "per_second_read_rates": rates,
            "statuses": statuses,
            "history_rows": history,
            "thumbnail_requests": thumbnails,
            "dead_letters": dead,
            "cpu_percent": cpu_percent(cpu_before, cpu_after, wall),
        }
    if args.cprofile and stats_file.exists():
        meta["cprofile"] = summarize_cprofile(stats_file, top=25)
    meta["calibration_end"] = calibrate()
    git = meta["git"]
    commit = git.get("commit", "?")[:8] + ("+dirty" if git.get("dirty") else "")
    print(
        f"\ngengui status-consumer drain, {meta['started_at']} ({meta['machine']['nproc']} cores, "
        f"{meta['machine']['cpu']}; PostgreSQL {meta['servers']['postgres']} / "
        f"{meta['servers']['redis']}; commit {commit}"
        f"{'; UNDER cProfile' if args.cprofile else ''})"
    )
    if args.set:
        print(f"settings: {' '.join(args.set)}")
    print(
        f"{result['events']} events ({result['generations']} generations: processing + "
        f"completed) drained in {result['wall_s']:.2f} s: "
        f"{result['events_per_s']:.0f} events/s, {result['generations_per_s']:.0f} generations/s"
    )
    if "processing_events_per_s" in result:
        print(
            f"by kind (from 1 s samples): processing {result['processing_events_per_s']:.0f}"
            f" events/s, completed {result['completed_events_per_s']:.0f} events/s"
        )
    print(f"read rate per second (entries): {result['per_second_read_rates']}")
    cpu = result["cpu_percent"]
    print(
        "cpu % of one core: "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if not k.startswith("machine"))
        + f"; machine busy {cpu['machine']:.0f}% (steal {cpu['machine_steal']:.0f}%)"
    )
    if cpu["other"] > 25:
        print(f"warning: {cpu['other']:.0f}% of a core went to other work on this machine")
    print(
        f"final: rows {result['statuses']}, history rows {result['history_rows']}, "
        f"thumbnail requests {result['thumbnail_requests']}, dead letters "
        f"{result['dead_letters']}; consumer start-up {meta['startup_s']} s"
    )
    print_calibration(meta)
    print(f"exit codes: {meta.get('exit_codes')}")
    if "cprofile" in meta:
        print_cprofile("consumer", meta["cprofile"], top=25)
    write_results("status-drain", stamp, {**meta, "result": result})
    problems = []
    if result["statuses"].get("completed") != result["generations"]:
        problems.append(f"not every row completed: {result['statuses']}")
    if result["history_rows"] != 2 * result["generations"]:
        problems.append(f"history rows {result['history_rows']} != {2 * result['generations']}")
    if result["thumbnail_requests"] != result["generations"]:
        problems.append(f"thumbnail requests {result['thumbnail_requests']}")
    if result["dead_letters"]:
        problems.append(f"{result['dead_letters']} dead letters")
    problems += [f"{k} exited with {v}" for k, v in meta.get("exit_codes", {}).items() if v != 0]
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
