"""Reconciler tick vs table size: ``Reconciler(rt).tick()`` timed in-process.

    .venv/bin/python bench/reconciler_tick.py                 # 10k, 100k, 1M finished rows
    .venv/bin/python bench/reconciler_tick.py --sizes 10000,100000 --kinds queued
    .venv/bin/python bench/reconciler_tick.py --cprofile      # + where a tick's time goes

The table grows to each of ``--sizes`` finished rows (90 % completed with a thumbnail,
8 % failed, 2 % cancelled; INSERT ... SELECT generate_series, then VACUUM ANALYZE).
Beside them live ``--stuck`` rows of each kind, not due; at each size:

- **empty**: ``--empty-ticks`` ticks with nothing due: the cost of the scans alone;
- per kind in ``--kinds``, ``--rounds`` rounds: the kind's rows are made due
  (their checks in ``generation_checks`` in the past: *re-armed*), then ``tick()`` is
  called until none is due (a tick leases at most ``reconciler.loop.BATCH`` rows,
  1,000: 1,000 stuck rows take one tick). Kinds, each a recovery that leaves the row
  as it was so rounds repeat (a round that retries a row is an error): ``queued``
  (never dispatched: requeued, one XADD each in one pipeline), ``submitted`` (local
  job with a backlog in the worker queue: left alone, one XINFO for the queue),
  ``processing`` (local job whose worker heartbeats, its key naming the job: left
  alone, one MGET of the runners' keys), ``mixed`` (a third of each).

Figures: tick ms (p50 / max) for the empty tick and for the first tick of each round
(a full lease), ms for all ticks of a round, and CPU ms per round: this process's (the
reconciler's own work, p50), the Postgres processes' of the bench database and the
Redis server's (``CpuMeter``, means over the rounds: /proc counts in 10 ms ticks).
Servers, database and prefix as in ``bench/e2e.py``; results on stdout and in
``bench/results/reconciler-tick-<ts>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import cProfile
import datetime as dt
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    BenchError,
    CpuMeter,
    Procs,
    _machine_cpu_s,
    calibrate,
    drop_prefix,
    fresh_database,
    git_info,
    log,
    machine_info,
    print_calibration,
    print_cprofile,
    run_bounded,
    server_versions,
    start_servers,
    summarize_cprofile,
    write_results,
)

from core import heartbeats
from core.cli import tune_gc
from core.keys import GROUP_GPU_WORKERS
from core.logging import configure_logging
from core.runtime import Runtime, open_runtime
from core.settings import Settings
from reconciler.loop import BATCH, Reconciler

KINDS = ("queued", "submitted", "processing")
WORKER = "bench-worker"

_FINISHED = """
    INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width, height,
                             seed, error_code, image_key, image_content_type, thumbnail_key,
                             progress, created_at, updated_at, completed_at)
    SELECT gen_random_uuid(), $3,
           CASE WHEN i % 50 = 0 THEN 'cancelled' WHEN i % 12 = 0 THEN 'failed'
                ELSE 'completed' END,
           1, 'local', 'finished #' || i || ': a lighthouse on a cliff at dusk', 1024, 1024, i,
           CASE WHEN i % 50 <> 0 AND i % 12 = 0 THEN 'generation_failed' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'bulk/' || i || '/original.png' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'image/png' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 'bulk/' || i || '/thumb-128.webp' END,
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN 1.0 END,
           now() - make_interval(secs => i), now() - make_interval(secs => i),
           CASE WHEN i % 50 <> 0 AND i % 12 <> 0 THEN now() - make_interval(secs => i) END
      FROM generate_series($1::int, $2::int) AS i
"""

# Live rows, not due until armed. The deadline is far off: no deadline recovery.
_LIVE = """
    WITH ins AS (
        INSERT INTO generations (id, user_id, status, attempt, provider, prompt, width, height,
                                 seed, created_at, updated_at, deadline_at)
        SELECT gen_random_uuid(), $1, $2, 1, 'local', 'stuck #' || i, 256, 256, i,
               now(), now(), now() + interval '2 days'
          FROM generate_series(1, $3::int) AS i
        RETURNING id
    ), chk AS (
        INSERT INTO generation_checks (generation_id, due_at)
        SELECT id, now() + interval '1 day' FROM ins
    )
    SELECT id FROM ins
"""

_ARM = """UPDATE generation_checks SET due_at = now() - interval '1 second'
           WHERE generation_id = ANY($1)"""
_DISARM = """UPDATE generation_checks SET due_at = now() + interval '1 day'
              WHERE generation_id = ANY($1)"""
_DUE = "SELECT count(*) FROM generation_checks WHERE due_at <= now()"


async def load_finished(rt: Runtime, user_id: UUID, lo: int, hi: int) -> float:
    """Rows lo..hi in two parallel INSERTs (two cores), then VACUUM ANALYZE; seconds."""
    t0 = time.perf_counter()
    mid = (lo + hi) // 2

    async def insert(a: int, b: int) -> None:
        async with rt.pool.acquire() as conn:
            await conn.execute(_FINISHED, a, b, user_id, timeout=1800)

    await asyncio.gather(insert(lo, mid), insert(mid + 1, hi))
    async with rt.pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE generations", timeout=1800)
        await conn.execute("VACUUM ANALYZE generation_events", timeout=600)
    return time.perf_counter() - t0


async def make_stuck(rt: Runtime, user_id: UUID, per_kind: int) -> dict[str, list[UUID]]:
    """``per_kind`` live rows of each kind, plus what makes each recovery a no-op:
    a backlog in the local job stream, a processing history row and a live heartbeat."""
    stuck: dict[str, list[UUID]] = {}
    for kind in KINDS:
        rows = await rt.pool.fetch(_LIVE, user_id, kind, per_kind)
        stuck[kind] = [r["id"] for r in rows]
    await rt.pool.execute(
        """INSERT INTO generation_events (generation_id, attempt, status, detail)
           SELECT id, 1, 'processing', $2::jsonb FROM unnest($1::uuid[]) AS id""",
        stuck["processing"],
        {"source": WORKER},
    )
    await rt.pool.execute(  # the runner, as the status consumer records it
        "UPDATE generations SET runner = $2 WHERE id = ANY($1)", stuck["processing"], WORKER
    )
    keys = rt.settings.keys
    # One entry no runner took yet: the queue is slow, not lost (lag 1).
    await rt.redis.xadd(keys.jobs_local, {"__data__": b"{}"})
    await rt.redis.xgroup_create(keys.jobs_local, GROUP_GPU_WORKERS, id="0")
    # The key as a live worker writes it, naming every job it holds (core.heartbeats).
    held = heartbeats.InHand()
    held.jobs.update(heartbeats.job_ref(g, 1) for g in stuck["processing"])
    await rt.redis.set(keys.worker_heartbeat(WORKER), held.value(), ex=3600)
    return stuck


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None, "n": 0}
    return {
        "p50": round(1000 * statistics.median(values), 2),
        "max": round(1000 * max(values), 2),
        "n": len(values),
    }


async def measure(
    rt: Runtime,
    rec: Reconciler,
    stuck: dict[str, list[UUID]],
    args: argparse.Namespace,
    profiler: cProfile.Profile | None,
    meter: CpuMeter,
) -> dict[str, Any]:
    """Empty ticks, then rounds of each kind; every tick timed on its own."""
    out: dict[str, Any] = {}
    empty: list[float] = []
    for _ in range(args.empty_ticks):
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        counts = await rec.tick()
        if profiler:
            profiler.disable()
        empty.append(time.perf_counter() - t0)
        if any(counts.values()):
            raise BenchError(f"an empty tick recovered something: {counts}")
    out["empty"] = _ms(empty)
    for kind in args.kinds:
        if kind == "mixed":
            # ``--stuck`` rows in all, a third of each kind.
            shares = [args.stuck // 3 + (1 if i < args.stuck % 3 else 0) for i in range(3)]
            ids = [g for k, n in zip(KINDS, shares, strict=True) for g in stuck[k][:n]]
        else:
            ids = stuck[kind]
        queued = len(set(ids) & set(stuck["queued"]))
        first: list[float] = []
        rounds: list[float] = []
        cpu: list[float] = []
        servers_cpu: Counter[str] = Counter()
        ticks_per_round: list[int] = []
        for _ in range(args.rounds):
            await rt.pool.execute(_ARM, ids)
            elapsed: list[float] = []
            cpu_s = 0.0
            counts: Counter[str] = Counter()
            while True:
                before = meter.snapshot()  # outside the timed tick: it reads all of /proc
                t0, c0 = time.perf_counter(), time.process_time()
                if profiler:
                    profiler.enable()
                counts.update(await rec.tick())
                if profiler:
                    profiler.disable()
                elapsed.append(time.perf_counter() - t0)
                cpu_s += time.process_time() - c0
                after = meter.snapshot()
                servers_cpu.update({k: after[k] - before[k] for k in ("postgres", "redis")})
                if await rt.pool.fetchval(_DUE) == 0:
                    break
                if len(elapsed) > 2 + len(ids) // BATCH:
                    raise BenchError(f"{kind}: rows still due after {len(elapsed)} ticks")
            if counts["requeue"] != queued or counts["retry"] or counts["exhausted"]:
                raise BenchError(f"{kind}: {queued} queued rows, but the round did {counts}")
            first.append(elapsed[0])
            rounds.append(sum(elapsed))
            cpu.append(cpu_s)
            ticks_per_round.append(len(elapsed))
            await rt.pool.execute(_DISARM, ids)
        out[kind] = {
            "rows": len(ids),
            "first_tick": _ms(first),
            "round": _ms(rounds),
            "cpu_ms_per_round": _ms(cpu)["p50"],
            # Clock ticks of 10 ms per process: a mean over the rounds, not a p50.
            "postgres_cpu_ms_per_round": round(1000 * servers_cpu["postgres"] / args.rounds, 1),
            "redis_cpu_ms_per_round": round(1000 * servers_cpu["redis"] / args.rounds, 1),
            "ticks_per_round": max(ticks_per_round),
        }
    return out


async def explain(rt: Runtime, rec: Reconciler) -> dict[str, str]:
    """Execution time and top plan node of each scan of an empty tick (rolled back)."""
    from reconciler import loop

    plans: dict[str, str] = {}
    checks = rec._leased_for_check
    queries = {
        "lease_due": (
            loop._LEASE_DUE,
            BATCH,
            rec.grace,
            list(checks),
            list(checks.values()),
            rec.thumbnail_grace,
        ),
        "past_deadline": (loop._PAST_DEADLINE, BATCH),
    }
    async with rt.pool.acquire() as conn:
        for name, (sql, *params) in queries.items():
            tr = conn.transaction()
            await tr.start()
            try:
                rows = await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}", *params)
            finally:
                await tr.rollback()
            lines = [r[0] for r in rows]
            scans = [ln.strip() for ln in lines if "Scan" in ln]
            total = next((ln for ln in lines if ln.startswith("Execution Time")), "")
            plans[name] = f"{total}; {' | '.join(scans[:2])}"
    return plans


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sizes", default="10000,100000,1000000", help="finished rows, ascending, comma-separated"
    )
    p.add_argument("--stuck", type=int, default=1000, help="stuck rows of each kind")
    p.add_argument(
        "--kinds",
        default="queued,submitted,processing,mixed",
        help="stuck kinds to measure: queued, submitted, processing, mixed",
    )
    p.add_argument("--rounds", type=int, default=5, help="re-armed rounds per kind and size")
    p.add_argument("--empty-ticks", type=int, default=20, help="ticks with nothing due per size")
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="cProfile the ticks at the largest size (slower: compare shares, not times)",
    )
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.sizes != sorted(args.sizes):
        p.error("--sizes must ascend (rows are added, never removed)")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in args.kinds:
        if kind not in (*KINDS, "mixed"):
            p.error(f"unknown kind {kind!r}")
    return args


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-reconciler-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    token = secrets.token_hex(4)
    db_name = f"gengui_bench_{token}"
    prefix = f"bench{token}"
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
        "batch": BATCH,
    }
    meta["calibration_start"] = calibrate()
    results: list[dict[str, Any]] = []
    profiler = cProfile.Profile(time.process_time) if args.cprofile else None
    configure_logging("json", "WARNING")
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        meta["servers"] = await server_versions(servers)
        database_url = await fresh_database(stack, servers, db_name)
        log(f"database {db_name}, stream prefix {prefix}")
        settings = Settings(
            database_url=database_url,
            redis_url=servers.redis_url,
            stream_prefix=prefix,
            data_dir=tmp / "data",
            log_level="WARNING",
        )
        rt = await stack.enter_async_context(open_runtime(settings))

        stack.push_async_callback(drop_prefix, rt.redis_url, prefix)
        from core.auth import create_user

        user_id = await create_user(rt.pool, f"reconciler-{token}@example.com")
        stuck = await make_stuck(rt, user_id, args.stuck)
        rec = Reconciler(rt)
        loaded = 0
        for size in args.sizes:
            log(f"loading finished rows {loaded + 1}..{size}")
            load_s = await load_finished(rt, user_id, loaded + 1, size)
            loaded = size
            profile_here = profiler if size == args.sizes[-1] else None
            log(f"{size} finished rows (loaded in {load_s:.1f} s): ticking")
            entry: dict[str, Any] = {"finished_rows": size, "load_s": round(load_s, 2)}
            entry["table_mb"] = round(
                await rt.pool.fetchval("SELECT pg_total_relation_size('generations')") / 2**20, 1
            )
            busy0, _, total0 = _machine_cpu_s()
            own0, wall0 = _own_cpu_s(), time.perf_counter()
            meter = CpuMeter(Procs({}, tmp), db_name)
            # Collected as `gengui reconciler` collects (core.cli.tune_gc), the loading's
            # objects frozen: default thresholds had a full collection of this process
            # (68-91 ms) land in about one tick of thirty.
            tune_gc()
            entry.update(await measure(rt, rec, stuck, args, profile_here, meter))
            busy1, _, total1 = _machine_cpu_s()
            wall = time.perf_counter() - wall0
            # Whether the box was ours: this process's share, and the whole machine's.
            entry["cpu"] = {
                "bench_percent_of_core": round(100 * (_own_cpu_s() - own0) / wall, 1),
                "machine_busy_percent": round(100 * (busy1 - busy0) / (total1 - total0), 1),
            }
            entry["explain_empty"] = await explain(rt, rec)
            results.append(entry)
    meta["calibration_end"] = calibrate()
    git = meta["git"]
    commit = git.get("commit", "?")[:8] + ("+dirty" if git.get("dirty") else "")
    print(
        f"\ngengui reconciler tick, {meta['started_at']} ({meta['machine']['nproc']} cores, "
        f"{meta['machine']['cpu']}; PostgreSQL {meta['servers']['postgres']} / "
        f"{meta['servers']['redis']}; commit {commit}"
        f"{'; ticks at the largest size UNDER cProfile' if args.cprofile else ''})"
    )
    print(
        f"{args.stuck} stuck rows per kind, leased {BATCH} per tick; ms per tick (p50 / max); "
        f"'round' = every tick until none is due; CPU ms per round: 'cpu ms' this process (p50),\n"
        f"'pg' the Postgres processes of this database, 'redis' the Redis server (means)"
    )
    head = (
        f"{'finished rows':>13}{'MB':>6}  {'due rows':<20}{'1st tick p50':>13}{'max':>8}"
        f"{'round p50':>11}{'max':>8}{'ticks':>7}{'cpu ms':>8}{'pg':>7}{'redis':>7}"
    )
    print(head)
    print("-" * len(head))
    for e in results:
        lead = f"{e['finished_rows']:>13}{e['table_mb']:>6.0f}  "
        print(f"{lead}{'none (empty tick)':<20}{e['empty']['p50']:>13.2f}{e['empty']['max']:>8.2f}")
        for kind in args.kinds:
            k = e[kind]
            label = f"{k['rows']} {kind}"
            print(
                f"{lead}{label:<20}{k['first_tick']['p50']:>13.1f}{k['first_tick']['max']:>8.1f}"
                f"{k['round']['p50']:>11.1f}{k['round']['max']:>8.1f}{k['ticks_per_round']:>7}"
                f"{k['cpu_ms_per_round']:>8.1f}{k['postgres_cpu_ms_per_round']:>7.0f}"
                f"{k['redis_cpu_ms_per_round']:>7.0f}"
            )
    print(
        "cpu while ticking (this process, % of one core / machine busy, % of all cores): "
        + ", ".join(
            f"{e['finished_rows']} rows {e['cpu']['bench_percent_of_core']:.0f} / "
            f"{e['cpu']['machine_busy_percent']:.0f}"
            for e in results
        )
    )
    print("empty tick, each scan (EXPLAIN ANALYZE):")
    for e in results:
        for name, plan in e["explain_empty"].items():
            print(f"  {e['finished_rows']:>8} {name:<17} {plan}")
    print_calibration(meta)
    if profiler is not None:
        stats_file = tmp / "ticks.prof"
        profiler.dump_stats(str(stats_file))
        meta["cprofile"] = summarize_cprofile(stats_file, top=25)
        print_cprofile("ticks", meta["cprofile"], top=25)
    write_results("reconciler-tick", stamp, {**meta, "results": results})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
