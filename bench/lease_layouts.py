"""The reconciler's lease in other table layouts, side by side: where a tick's time goes.

    .venv/bin/python bench/lease_layouts.py                  # 1M finished rows, 10 rounds
    .venv/bin/python bench/lease_layouts.py --finished 100000 --rounds 20

A fresh, migrated database gets ``--finished`` finished rows and ``--stuck``
``processing`` rows (``bench/reconciler_tick.py``'s loaders), then copies of the table in
other layouts. Each round re-arms the stuck rows of every layout (due now) and times
one lease of ``reconciler.loop.BATCH`` rows in each, the order reversed every other
round; it prints the p50 and min per layout and the WAL the lease wrote per row
(``pg_current_wal_lsn`` before and after: the server's, so run it on a quiet one).

Layouts:
- ``checks``: gengui's, since migration 0006: the schedule in ``generation_checks``
  (``generation_id`` primary key, ``due_at`` indexed); a lease of the shape of
  ``reconciler.loop._LEASE_DUE`` updates it, joining ``generations`` for the columns
  the reconciler reads. Every layout's lease sets one constant interval, where
  gengui's picks one per status and provider with a ``CASE`` (the same for all
  layouts, so left out of all);
- ``wide``: the layout before 0006, rebuilt as a copy of ``generations`` with
  ``next_check_at`` on the row and its indexes (the lease an ``UPDATE`` of the wide
  rows, each live one in five indexes);
- ``fillfactor80``: ``wide`` with fillfactor 80, so a row's new version can stay on its
  page.

Only ``checks`` is gengui's code path; the others measure the designs it was chosen over.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    BenchError,
    calibrate,
    drop_prefix,
    fresh_database,
    git_info,
    log,
    machine_info,
    print_calibration,
    run_bounded,
    server_versions,
    start_servers,
    write_results,
)
from reconciler_tick import _LIVE, load_finished

from core.logging import configure_logging
from core.runtime import open_runtime
from core.settings import Settings
from reconciler.loop import BATCH

_LIVE_WHERE = "status IN ('queued', 'submitted', 'processing')"
_RETURNING = "g.id, g.user_id, g.status, g.attempt, g.provider, g.provider_job_id, g.runner"


def _wide_lease(table: str) -> str:
    return f"""
        WITH due AS (
            SELECT id FROM {table} WHERE {_LIVE_WHERE} AND next_check_at <= now()
             ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED)
        UPDATE {table} g SET next_check_at = now() + interval '2 minutes'
          FROM due WHERE g.id = due.id
        RETURNING {_RETURNING}, g.updated_at"""


def _wide_copy(table: str, fillfactor: int) -> tuple[Sequence[str], str, str]:
    """``generations`` as it was before migration 0006: the check on the row."""
    return (
        (
            f"CREATE TABLE {table} (LIKE generations INCLUDING DEFAULTS, "
            f"next_check_at timestamptz) WITH (fillfactor = {fillfactor})",
            f"INSERT INTO {table} SELECT g.*, c.due_at FROM generations g "
            "LEFT JOIN generation_checks c ON c.generation_id = g.id ORDER BY g.created_at",
            f"ALTER TABLE {table} ADD PRIMARY KEY (id)",
            f"CREATE INDEX ON {table} (user_id, created_at DESC, id DESC)",
            f"CREATE INDEX ON {table} (next_check_at) WHERE {_LIVE_WHERE}",
            f"CREATE INDEX ON {table} (deadline_at) WHERE {_LIVE_WHERE}",
            f"CREATE INDEX ON {table} (user_id) WHERE {_LIVE_WHERE}",
            f"CREATE INDEX ON {table} (next_check_at) "
            "WHERE status = 'completed' AND thumbnail_key IS NULL",
        ),
        f"UPDATE {table} SET next_check_at = now() - interval '1 second' "
        "WHERE status = 'processing'",
        _wide_lease(table),
    )


# (setup statements, arm, lease) per layout; ``checks`` needs no setup.
LAYOUTS: dict[str, tuple[Sequence[str], str, str]] = {
    "checks": (
        (),
        "UPDATE generation_checks SET due_at = now() - interval '1 second'",
        f"""
        WITH due AS (
            SELECT generation_id FROM generation_checks WHERE due_at <= now()
             ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
        UPDATE generation_checks c SET due_at = now() + interval '2 minutes'
          FROM due JOIN generations g ON g.id = due.generation_id
         WHERE c.generation_id = due.generation_id
        RETURNING {_RETURNING}, g.updated_at""",
    ),
    "wide": _wide_copy("layout_wide", 100),
    "fillfactor80": _wide_copy("layout_ff", 80),
}


async def _explain(conn: Any, name: str) -> list[str]:
    """The plan of one more lease of ``name``, re-armed first."""
    _, arm, lease = LAYOUTS[name]
    await conn.execute(arm)
    await asyncio.sleep(0.2)
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) {lease}", BATCH)
    return [r[0] for r in rows]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--finished", type=int, default=1_000_000, help="finished rows")
    p.add_argument("--stuck", type=int, default=BATCH, help="processing rows leased each round")
    p.add_argument("--rounds", type=int, default=10, help="leases per layout")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    p.add_argument(
        "--explain",
        action="store_true",
        help="after the rounds, print EXPLAIN (ANALYZE, BUFFERS, WAL) of one more lease each",
    )
    args = p.parse_args(argv)
    if args.stuck < 1 or args.rounds < 1:
        p.error("--stuck and --rounds must be at least 1")
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in args.layouts:
        if name not in LAYOUTS:
            p.error(f"unknown layout {name!r}")
    return args


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-lease-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    token = secrets.token_hex(4)
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
        "calibration_start": calibrate(),
    }
    configure_logging("json", "WARNING")
    times: dict[str, list[float]] = {name: [] for name in args.layouts}
    wal: dict[str, list[int]] = {name: [] for name in args.layouts}
    plans: dict[str, list[str]] = {}
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        meta["servers"] = await server_versions(servers)
        url = await fresh_database(stack, servers, f"gengui_bench_{token}")
        settings = Settings(
            database_url=url,
            redis_url=servers.redis_url,
            stream_prefix=f"bench{token}",
            data_dir=tmp / "d",
        )
        rt = await stack.enter_async_context(open_runtime(settings))
        stack.push_async_callback(drop_prefix, rt.redis_url, settings.stream_prefix)
        from core.auth import create_user

        user_id = await create_user(rt.pool, f"lease-{token}@example.com")
        log(f"loading {args.finished} finished rows and {args.stuck} processing rows")
        await load_finished(rt, user_id, 1, args.finished)
        await rt.pool.execute(_LIVE, user_id, "processing", args.stuck)
        for name in args.layouts:
            for sql in LAYOUTS[name][0]:
                await rt.pool.execute(sql, timeout=600)
        await rt.pool.execute("VACUUM ANALYZE", timeout=1800)
        log("leasing")
        async with rt.pool.acquire() as conn:
            for r in range(args.rounds):
                for name in args.layouts if r % 2 == 0 else args.layouts[::-1]:
                    _, arm, lease = LAYOUTS[name]
                    await conn.execute(arm)
                    await asyncio.sleep(0.2)  # the arm's writes settle, as between ticks
                    lsn0 = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
                    t0 = time.perf_counter()
                    rows = await conn.fetch(lease, BATCH)
                    times[name].append(1000 * (time.perf_counter() - t0))
                    lsn1 = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
                    wal[name].append(
                        await conn.fetchval("SELECT pg_wal_lsn_diff($1, $2)::bigint", lsn1, lsn0)
                    )
                    if len(rows) != min(BATCH, args.stuck):
                        raise BenchError(
                            f"{name}: leased {len(rows)} rows, not {min(BATCH, args.stuck)}"
                        )
            if args.explain:
                plans = {name: await _explain(conn, name) for name in args.layouts}
    meta["calibration_end"] = calibrate()
    results = {
        name: {
            "p50_ms": round(statistics.median(times[name]), 1),
            "min_ms": round(min(times[name]), 1),
            "wal_bytes_per_row": round(statistics.median(wal[name]) / min(BATCH, args.stuck)),
            "ms": [round(t, 2) for t in times[name]],
        }
        for name in args.layouts
    }
    print(
        f"\nreconciler lease by table layout, {meta['started_at']} "
        f"({meta['machine']['nproc']} cores; PostgreSQL {meta['servers']['postgres']}; "
        f"{args.finished} finished rows, {args.stuck} leased, {args.rounds} rounds alternated)"
    )
    print(f"{'layout':<14}{'p50 ms':>8}{'min ms':>8}{'WAL B/row':>11}")
    for name, r in results.items():
        print(f"{name:<14}{r['p50_ms']:>8.1f}{r['min_ms']:>8.1f}{r['wal_bytes_per_row']:>11}")
    if args.explain:
        for name in args.layouts:
            print(f"\n{name}:")
            print("\n".join(f"  {line}" for line in plans[name]))
    print_calibration(meta)
    write_results("lease-layouts", started.strftime("%Y%m%d-%H%M%S"), {**meta, **results})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
