"""Local worker drain: how many jobs one ``gengui worker`` process runs per second, and
its CPU per job, for settings variants alternated in one run (side by side).

    .venv/bin/python bench/worker_drain.py                       # instant engine, 4000 jobs
    .venv/bin/python bench/worker_drain.py --variant now= \\
        --variant eager=GENGUI_WORKER_PROCESSING_AFTER_S=0 --rounds 3
    .venv/bin/python bench/worker_drain.py --engine placeholder --n 1000

Each round of each variant: ``--n`` jobs (``LocalJob`` messages as dispatch writes them)
are put on a fresh ``jobs:local`` stream, then one worker is started with the variant's
settings, and the clock runs from its first read (the group's ``entries-read`` > 0) until
every job has its final report on ``job:status`` and nothing is pending. The worker needs
Redis and the image directory, never the database. Variants run in turn, round by round
(A B, B A, A B, ...), so a drifting VM does not favour one. Printed per round: jobs/s,
the worker's CPU per job (ms, from /proc), reports per job, Redis CPU; then each
variant's medians and their ratios to the first variant.

Servers as in ``bench/e2e.py``; results on stdout and in
``bench/results/worker-drain-<ts>.json``.
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
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    git_info,
    log,
    machine_info,
    print_calibration,
    process_env,
    run_bounded,
    server_versions,
    start_servers,
    write_results,
)
from status_drain import fill_stream

from core.events import DATA_FIELD, JobStatus, LocalJob
from core.keys import GROUP_GPU_WORKERS, Keys
from core.streams import encode

FINAL = {"completed", "failed"}


def jobs(n: int) -> list[dict[Any, Any]]:
    user_id = uuid.uuid4()
    return [
        encode(
            LocalJob(
                generation_id=uuid.uuid4(),
                attempt=1,
                user_id=user_id,
                prompt=f"drain #{i}: a lighthouse on a cliff at dusk",
                width=256,
                height=256,
                seed=i,
            )
        )
        for i in range(n)
    ]


async def group(client: aioredis.Redis, stream: str) -> dict[str, int]:
    for g in await client.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP_GPU_WORKERS:
            return {"read": int(g.get("entries-read") or 0), "pending": int(g["pending"])}
    raise BenchError(f"group {GROUP_GPU_WORKERS} vanished from {stream}")


async def final_reports(client: aioredis.Redis, stream: str, last: bytes) -> tuple[int, bytes]:
    """Final reports after entry ``last``; returns (count, new last id)."""
    count = 0
    while True:
        entries = await client.xrange(stream, min=f"({last.decode()}", count=5000)
        if not entries:
            return count, last
        for entry_id, fields in entries:
            last = entry_id
            if JobStatus.model_validate_json(fields[DATA_FIELD]).state in FINAL:
                count += 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="jobs per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every variant")
    p.add_argument("--engine", default="instant", choices=["instant", "placeholder"])
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=[GENGUI_X=V,...]",
        help="a named set of settings (comma-separated); default: 'now' (no settings) "
        "and 'eager' (GENGUI_WORKER_PROCESSING_AFTER_S=0)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GENGUI_X=V",
        help="a setting for every variant (default GENGUI_WORKER_CONCURRENCY=16)",
    )
    p.add_argument("--max-s", type=float, default=300.0, help="give up on a round after this")
    args = p.parse_args(argv)
    check_settings(p, args.set)
    if not args.variant:
        args.variant = ["now=", "eager=GENGUI_WORKER_PROCESSING_AFTER_S=0"]
    variants: dict[str, list[str]] = {}
    for item in args.variant:
        name, _, values = item.partition("=")
        settings = [v for v in values.split(",") if v]
        check_settings(p, settings)
        variants[name] = settings
    args.variants = variants
    if not any(s.startswith("GENGUI_WORKER_CONCURRENCY=") for s in args.set):
        args.set.append("GENGUI_WORKER_CONCURRENCY=16")
    return args


async def one_round(
    client: aioredis.Redis,
    base_env: dict[str, str],
    tmp: Path,
    name: str,
    settings: Sequence[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    prefix = f"wd{secrets.token_hex(4)}"
    keys = Keys(prefix)
    env = {**base_env, "GENGUI_STREAM_PREFIX": prefix, "GENGUI_WORKER_ENGINE": args.engine}
    env.update(item.split("=", 1) for item in [*args.set, *settings])
    await client.xgroup_create(keys.jobs_local, GROUP_GPU_WORKERS, id="0", mkstream=True)
    await fill_stream(client, keys.jobs_local, jobs(args.n))
    logs = tmp / f"logs-{prefix}"
    logs.mkdir()
    procs = Procs(env, logs)
    meter = CpuMeter(procs, "-")
    try:
        procs.start("worker", "worker")
        spawned = time.perf_counter()
        while (await group(client, keys.jobs_local))["read"] == 0:
            procs.check_alive()
            if time.perf_counter() - spawned > 60:
                raise BenchError("the worker read nothing in 60 s")
            await asyncio.sleep(0.005)
        t0, before = time.perf_counter(), meter.snapshot()
        done, last = 0, b"0-0"
        while True:
            more, last = await final_reports(client, keys.job_status, last)
            done += more
            if done >= args.n and (await group(client, keys.jobs_local))["pending"] == 0:
                break
            procs.check_alive()
            if time.perf_counter() - t0 > args.max_s:
                raise BenchError(f"{name}: {done}/{args.n} jobs done after {args.max_s} s")
            await asyncio.sleep(0.005)
        wall, after = time.perf_counter() - t0, meter.snapshot()
        reports = await client.xlen(keys.job_status)
    except BaseException:
        log("round failed; worker log:\n" + procs.tail())
        raise
    finally:
        codes = await asyncio.to_thread(procs.stop)
        await drop_prefix(base_env["GENGUI_REDIS_URL"], prefix)
    cpu = cpu_percent(before, after, wall)
    return {
        "variant": name,
        "jobs_per_s": round(args.n / wall, 1),
        "worker_cpu_ms_per_job": round(10 * cpu["worker"] * wall / args.n, 3),
        "redis_cpu_ms_per_job": round(10 * cpu["redis"] * wall / args.n, 3),
        "reports_per_job": round(reports / args.n, 2),
        "cpu_percent": cpu,
        "exit_code": codes.get("worker"),
    }


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-worker-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
        "calibration_start": calibrate(),
    }
    rounds: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        meta["servers"] = await server_versions(servers)
        client = aioredis.Redis.from_url(servers.redis_url)
        stack.push_async_callback(client.aclose)
        base_env = process_env(
            servers.admin_dsn, servers.redis_url, "unused", tmp / "data", free_port()
        )
        names = list(args.variants)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                log(f"round {r + 1}: {name}")
                rounds.append(
                    await one_round(client, base_env, tmp, name, args.variants[name], args)
                )
    meta["calibration_end"] = calibrate()
    git = meta["git"]
    commit = git.get("commit", "?")[:8] + ("+dirty" if git.get("dirty") else "")
    print(
        f"\ngengui worker drain, {meta['started_at']} ({meta['machine']['nproc']} cores, "
        f"{meta['machine']['cpu']}; redis {meta['servers']['redis']}; commit {commit}; "
        f"engine {args.engine}, {args.n} jobs a round; {' '.join(args.set)})"
    )
    for name, settings in args.variants.items():
        print(f"  {name}: {' '.join(settings) or '(defaults)'}")
    print(
        f"{'variant':12} {'jobs/s':>8} {'worker ms/job':>14} {'redis ms/job':>13} "
        f"{'reports/job':>12} {'busy %':>7} {'exit':>5}"
    )
    for row in rounds:
        print(
            f"{row['variant']:12} {row['jobs_per_s']:8.0f} {row['worker_cpu_ms_per_job']:14.3f} "
            f"{row['redis_cpu_ms_per_job']:13.3f} {row['reports_per_job']:12.2f} "
            f"{row['cpu_percent']['machine']:7.0f} {row['exit_code']!s:>5}"
        )
    summary: dict[str, dict[str, float]] = {}
    for name in args.variants:
        mine = [row for row in rounds if row["variant"] == name]
        summary[name] = {
            key: statistics.median(row[key] for row in mine)
            for key in ("jobs_per_s", "worker_cpu_ms_per_job")
        }
    first = next(iter(summary.values()))
    print("medians, and ratios to the first variant (throughput; worker CPU per job):")
    for name, med in summary.items():
        print(
            f"  {name:12} {med['jobs_per_s']:8.0f} jobs/s  {med['worker_cpu_ms_per_job']:.3f} "
            f"ms/job   x{med['jobs_per_s'] / first['jobs_per_s']:.2f}  "
            f"x{med['worker_cpu_ms_per_job'] / first['worker_cpu_ms_per_job']:.2f}"
        )
    print_calibration(meta)
    write_results("worker-drain", stamp, {**meta, "rounds": rounds, "summary": summary})
    return 0 if all(row["exit_code"] == 0 for row in rounds) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
