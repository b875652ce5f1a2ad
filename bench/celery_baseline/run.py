"""The Celery + Redis baseline, driven by ``bench/e2e.py``'s load generator.

    .venv/bin/python bench/celery_baseline/run.py --n 2000 --concurrency 64
    .venv/bin/python bench/celery_baseline/run.py --rates 100,200 --duration 10

Runs in gengui's virtualenv (the load generator, listener, phases, table and CPU
accounting are ``bench/e2e.py``'s own) and starts the baseline's processes from the
Celery virtualenv (``--celery-python``, default ``/tmp/celery-venv/bin/python``; see
README.md): ``web.py`` (aiohttp + asyncpg + ``dispatch.delay``) and one ``celery
worker`` (prefork, its default concurrency: one child per core). Same Postgres server
(a fresh ``gengui_bench_<random>`` database migrated with gengui's migrations), same
Redis server: the broker on database ``--celery-db`` (default 1) with a queue named
for the run; notices on pub/sub, which Redis does not split by database. The keys
the run added to the broker database are deleted at the end.

Latency is from the POST sent to the ``generation.completed`` notice received, as in
``bench/e2e.py``; the worker's CPU includes its pool children. Results:
``bench/results/celery-<ts>.json`` (same layout as e2e's).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e import (
    ROOT,
    CpuMeter,
    Listener,
    Load,
    PhaseResult,
    Procs,
    _proc_stat,
    calibrate,
    final_state,
    free_port,
    fresh_database,
    git_info,
    log,
    machine_info,
    phase_plan,
    print_calibration,
    print_table,
    process_env,
    run_bounded,
    run_phase,
    server_versions,
    start_servers,
    user_session,
    warm_up,
    write_results,
)

BENCH = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = "/tmp/celery-venv/bin/python"


class TreeCpuMeter(CpuMeter):
    """``CpuMeter`` with each process's descendants added to it: Celery's prefork
    children do the work, and /proc charges a child's CPU to the parent only once
    the child has exited and been reaped."""

    def snapshot(self) -> dict[str, float]:
        snap = super().snapshot()
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _proc_stat(entry.name)) is not None:
                parents.setdefault(st[1], []).append(int(entry.name))
        for name, proc in self.procs.procs.items():
            todo, extra = list(parents.get(proc.pid, [])), 0.0
            while todo:
                pid = todo.pop()
                st = _proc_stat(pid)
                extra += st[2] if st else 0.0
                todo += parents.get(pid, [])
            snap[name] = snap.get(name, 0.0) + extra
        return snap


def with_db_number(url: str, number: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{number}"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="closed loop: generations to submit")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: POSTs in flight")
    p.add_argument(
        "--engine",
        choices=["placeholder", "instant"],
        default="placeholder",
        help="what generate renders: gengui's placeholder or its instant engine's tiny PNG",
    )
    p.add_argument("--rate", type=float, help="open loop: POSTs per second")
    p.add_argument("--rates", help="open loop: comma-separated rates, run in sequence")
    p.add_argument("--duration", type=float, default=10.0, help="open loop: seconds per rate")
    p.add_argument("--size", type=int, default=256, help="width = height of each image")
    p.add_argument("--warmup", type=int, default=20, help="generations before measuring")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait per phase")
    p.add_argument("--stall-s", type=float, default=5.0, help="poll the API after this silence")
    p.add_argument("--max-runtime", type=float, default=1800.0, help="hard limit for the run")
    p.add_argument("--celery-python", default=DEFAULT_PYTHON, help="python of the Celery venv")
    p.add_argument("--celery-db", type=int, default=1, help="Redis database of the broker")
    p.add_argument("--pool", default="prefork", help="celery worker --pool")
    p.add_argument(
        "--celery-concurrency", type=int, help="celery worker --concurrency (default: cores)"
    )
    p.add_argument(
        "--no-processing-report",
        action="store_true",
        help="generate does not report 'processing' (one task fewer per generation)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, images)")
    args = p.parse_args(argv)
    if args.rate is not None and args.rates:
        p.error("give --rate or --rates, not both")
    if not Path(args.celery_python).exists():
        p.error(f"{args.celery_python} not found: make the Celery venv (README.md) first")
    # What bench/e2e.py's phases and table read from their args.
    args.no_thumbnails = True
    args.workers = 1
    return args


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-celery-"))
    token = secrets.token_hex(4)
    db_name = f"gengui_bench_{token}"
    prefix = f"bench{token}"
    queue = f"bench{token}"
    results: list[PhaseResult] = []
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
        "pipeline": "celery",
    }
    if args.keep:
        log(f"keeping {tmp}")
    else:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    meta["calibration_start"] = calibrate()
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        versions = await server_versions(servers)
        meta["servers"] = {
            "embedded": servers.embedded,
            "postgres_version": f"PostgreSQL {versions['postgres']}",
            "redis_version": versions["redis"],
        }
        celery_version = await asyncio.to_thread(
            lambda: os.popen(f"{args.celery_python} -m celery --version").read().strip()
        )
        meta["celery_version"] = celery_version
        database_url = await fresh_database(stack, servers, db_name)
        log(f"database {db_name}, prefix {prefix}, celery {celery_version}, queue {queue}")

        broker_url = with_db_number(servers.redis_url, args.celery_db)
        broker = aioredis.Redis.from_url(broker_url)
        stack.push_async_callback(broker.aclose)
        before = {k async for k in broker.scan_iter(count=1000)}

        async def clean_broker() -> None:
            added = [k async for k in broker.scan_iter(count=1000) if k not in before]
            if added:
                await broker.delete(*added)

        stack.push_async_callback(clean_broker)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = process_env(database_url, servers.redis_url, prefix, tmp / "data", port)
        from core.db import asyncpg_dsn

        env.update(
            BENCH_DATABASE_URL=asyncpg_dsn(database_url),
            BENCH_BROKER_URL=broker_url,
            BENCH_REDIS_URL=servers.redis_url,
            BENCH_PREFIX=prefix,
            BENCH_QUEUE=queue,
            BENCH_IMAGES_DIR=str(tmp / "data" / "images"),
            BENCH_PORT=str(port),
            BENCH_PROCESSING_REPORT="0" if args.no_processing_report else "1",
            BENCH_ENGINE=args.engine,
            PYTHONPATH=str(ROOT),
        )
        logs = tmp / "logs"
        logs.mkdir()
        procs = Procs(env, logs)
        meter = TreeCpuMeter(procs, db_name)

        async def inspect_final() -> None:
            try:
                meta["final_state"] = await final_state(database_url, servers.redis_url, prefix)
                meta["final_state"]["broker_queue_left"] = await broker.llen(queue)
            except Exception as exc:
                log(f"could not read the final state: {exc!r}")

        stack.push_async_callback(inspect_final)

        async def stop_procs() -> None:
            codes = await asyncio.to_thread(procs.stop)
            meta["exit_codes"] = codes

        stack.push_async_callback(stop_procs)
        listener = Listener(servers.redis_url, prefix)
        stack.push_async_callback(listener.close)
        await listener.start()

        py = args.celery_python
        procs.start_command("web", [py, str(BENCH / "celery_baseline" / "web.py")])
        worker = [py, "-m", "celery", "-A", "bench.celery_baseline.tasks", "worker"]
        worker += ["--loglevel", "WARNING", "-Q", queue, "--pool", args.pool]
        worker += ["--hostname", f"{queue}@%h"]
        if args.celery_concurrency:
            worker += ["--concurrency", str(args.celery_concurrency)]
        procs.start_command("celery", worker)
        try:
            async with (
                user_session(
                    procs, base_url, f"bench-{token}@example.com", args.concurrency
                ) as http,
                contextlib.aclosing(Load(http, listener, args, base_url=base_url)) as load,
            ):
                await warm_up(load, procs, meter, args)
                for name, kwargs in phase_plan(args):
                    results.append(await run_phase(name, load, procs, meter, args, **kwargs))
        except BaseException:
            log("run failed; process logs:\n" + procs.tail())
            raise
    meta["calibration_end"] = calibrate()
    print(f"\nCelery + Redis baseline ({meta['celery_version']}, pool {args.pool})")
    print_table(results, meta)
    print_calibration(meta)
    print(f"exit codes: {meta.get('exit_codes')}")
    print(f"final state: {meta.get('final_state')}")
    write_results("celery", stamp, {**meta, "results": [asdict(r) for r in results]})
    problems = [f"phase {r.name}: {r.failures} failed" for r in results if not r.ok]
    # Celery's worker exits 0 on SIGTERM (warm shutdown); anything else is a problem.
    problems += [f"{k} exited with {v}" for k, v in meta.get("exit_codes", {}).items() if v != 0]
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
