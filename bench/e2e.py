"""End-to-end benchmark: the real gengui processes, driven over HTTP.

Starts ``gengui api``, ``gengui consumers`` and ``gengui worker`` (placeholder engine) as
subprocesses against a fresh database and a fresh stream prefix, submits generations
with ``POST /api/v1/generations`` and times each one from the moment its request was
sent to the moment its ``generation.completed`` notice arrives on Redis pub/sub. The
database starts with ``--seed-rows`` finished generations, analysed, as a deployment's
has (``bench/seed.py``: from an empty table the hot paths' lookups scan it whole).

    .venv/bin/python bench/e2e.py --n 2000 --concurrency 64          # closed loop
    .venv/bin/python bench/e2e.py --n 2000 --concurrency 64 --no-thumbnails
    .venv/bin/python bench/e2e.py --rates 50,100,200 --duration 10   # open loop

Servers: ``GENGUI_DATABASE_URL`` (an admin DSN: a database is created on that server
and dropped after) and ``GENGUI_REDIS_URL`` when set, embedded ones otherwise. Results
are printed as a table and written to ``bench/results/e2e-<timestamp>.json``. Exits 1
if any generation failed or did not complete in time, a thumbnail is missing (thumbnails
on), a message was dead-lettered, or a process did not exit cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
# This tree's gengui, not the venv's editable install (which names the checkout the venv
# was made from): a bench run from an older commit's worktree migrates and imports that
# commit's code, as ``process_env`` makes the processes it starts do.
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The notices the listener keeps a receive time for, per generation id.
EVENTS = (
    "generation.submitted",
    "generation.processing",
    "generation.completed",
    "generation.failed",
    "thumbnail.ready",
)


class BenchError(RuntimeError):
    """The run cannot go on (a process died, warm-up failed): reported without a traceback."""


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the result table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Servers:
    admin_dsn: str
    redis_url: str
    embedded: bool


def with_database(url: str, name: str) -> str:
    """Swap the database name in a DSN, keeping host, user and query (unix sockets)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def start_servers(tmp: Path) -> Servers:
    """The configured servers, or embedded ones under ``tmp`` (they stop when we exit)."""
    db = os.environ.get("GENGUI_DATABASE_URL") or None
    rd = os.environ.get("GENGUI_REDIS_URL") or None
    if db is None or rd is None:
        from core.embedded import start_postgres, start_valkey

        if db is None:
            log("starting embedded PostgreSQL")
            db = with_database(start_postgres(tmp / "postgres"), "postgres")
        if rd is None:
            log("starting embedded Valkey")
            rd = start_valkey(tmp / "valkey")
        return Servers(db, rd, embedded=True)
    return Servers(db, rd, embedded=False)


async def drop_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key of a run's prefix: streams, replay logs, heartbeats (a run's
    replay logs would otherwise live for their hour and slow every SCAN of the server)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def admin_sql(admin_dsn: str, sql: str) -> Any:
    from core.db import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn), timeout=10)
    try:
        return await conn.fetchval(sql, timeout=60)
    finally:
        await conn.close(timeout=10)


async def fresh_database(stack: contextlib.AsyncExitStack, servers: Servers, db_name: str) -> str:
    """Create ``db_name`` on the run's server, migrate it, and drop it (``WITH (FORCE)``)
    when ``stack`` closes; returns its URL. Every benchmark measures a fresh database."""
    from core.cli import migrate

    await admin_sql(servers.admin_dsn, f'CREATE DATABASE "{db_name}"')
    stack.push_async_callback(
        admin_sql, servers.admin_dsn, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'
    )
    database_url = with_database(servers.admin_dsn, db_name)
    await asyncio.to_thread(migrate, database_url)
    return database_url


def print_calibration(meta: dict[str, Any]) -> None:
    c0, c1 = meta["calibration_start"], meta["calibration_end"]
    print(
        f"calibration (fixed work, ms; start -> end): render 256px {c0['render_256px_ms']} -> "
        f"{c1['render_256px_ms']}, python loop {c0['python_loop_ms']} -> {c1['python_loop_ms']}"
    )


def write_results(name: str, stamp: str, data: dict[str, Any]) -> Path:
    """Save a run's figures as ``bench/results/<name>-<stamp>.json`` and say where."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_bytes(
        orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
    )
    print(f"results: {path.relative_to(ROOT)}")
    return path


async def server_versions(servers: Servers) -> dict[str, str]:
    pg = await admin_sql(servers.admin_dsn, "SHOW server_version")
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        info = await asyncio.wait_for(client.info("server"), 10)
    finally:
        await client.aclose()
    redis_version = (
        f"valkey {info['valkey_version']}"
        if "valkey_version" in info
        else f"redis {info.get('redis_version')}"
    )
    return {"postgres": str(pg), "redis": redis_version}


# --------------------------------------------------------------------------- processes


def gengui_command() -> list[str]:
    """The venv's ``gengui`` script, or the module when the script is not beside python."""
    script = Path(sys.executable).parent / "gengui"
    return [str(script)] if script.exists() else [sys.executable, "-m", "core.cli"]


def process_env(
    database_url: str, redis_url: str, prefix: str, data_dir: Path, port: int, **extra: str
) -> dict[str, str]:
    """The environment of every gengui process a benchmark starts: this machine's,
    less any GENGUI_* of the caller's shell, plus the run's own servers and names.

    ``PYTHONPATH`` puts this script's tree first: the venv's editable install points
    at the checkout it was made from, so without it a benchmark run from another
    worktree (an older commit, for a side-by-side run) would start the processes of
    the venv's checkout and compare that code with itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENGUI_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        GENGUI_DATABASE_URL=database_url,
        GENGUI_REDIS_URL=redis_url,
        GENGUI_STREAM_PREFIX=prefix,
        GENGUI_DATA_DIR=str(data_dir),
        GENGUI_API_PORT=str(port),
        GENGUI_LOG_LEVEL="WARNING",
    )
    env.update({**BENCH_LIMITS_OFF, **extra})
    return env


# A benchmark submits thousands of generations as one user: the per-user fair-use
# limits (core.limits) would refuse all but the first few. ``--set`` / ``extra`` win.
BENCH_LIMITS_OFF = {
    "GENGUI_REQUESTS_PER_MINUTE": "0",
    "GENGUI_MAX_ACTIVE_GENERATIONS": "0",
    "GENGUI_PLAN_QUOTAS": "{}",
}


def mock_provider_env(mock_url: str, provider: str, public_url: str) -> dict[str, str]:
    """Settings that send every generation to ``provider``, served by `gengui mock-providers`."""
    from providers.mock import DEFAULT_REPLICATE_SECRET

    return {
        "GENGUI_DEFAULT_PROVIDER": provider,
        "GENGUI_PUBLIC_URL": public_url,
        "GENGUI_RUNPOD_API_URL": f"{mock_url}/v2",
        "GENGUI_RUNPOD_ENDPOINT_ID": "bench",
        "GENGUI_RUNPOD_API_KEY": "bench",
        "GENGUI_REPLICATE_API_URL": mock_url,
        "GENGUI_REPLICATE_API_TOKEN": "bench",
        "GENGUI_REPLICATE_WEBHOOK_SECRET": DEFAULT_REPLICATE_SECRET,
        "GENGUI_GEMINI_API_URL": mock_url,
        "GENGUI_GEMINI_API_KEY": "bench",
        "GENGUI_OPENAI_API_URL": mock_url,
        "GENGUI_OPENAI_API_KEY": "bench",
        "GENGUI_DOWNLOAD_ALLOW_HTTP": "true",
        "GENGUI_DOWNLOAD_HOSTS": '["127.0.0.1"]',
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ``python -c`` body for Procs.start_profiled. The timer is the process's CPU clock, not
# the wall clock: on a busy two-core box a wall-clock profile charges the time a process
# sat preempted (typically inside ``socket.send``, which wakes its peer) to whatever
# call it was in. Only the main thread is profiled, but CPU that worker threads burn
# meanwhile is charged to the main thread's current call.
_CPROFILE_BOOT = """
import cProfile, runpy, sys, time
stats, sys.argv = sys.argv[1], ["gengui", *sys.argv[2:]]
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("core.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(stats)
"""


class Procs:
    """The gengui subprocesses of one run, each logging to its own file."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start_command(name, [*gengui_command(), *args])

    def start_profiled(self, name: str, stats: Path, *args: str) -> subprocess.Popen[bytes]:
        """``gengui ARGS`` under cProfile (stdlib, for when py-spy is not installed): the
        stats go to ``stats`` when the process exits, which it does cleanly on SIGTERM.
        Deterministic profiling slows Python code several fold: read shares, not speed."""
        command = [sys.executable, "-c", _CPROFILE_BOOT, str(stats)]
        return self.start_command(name, [*command, *args])

    def start_command(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        """Any command (a baseline's processes), logged and stopped like the others."""
        with open(self.logs / f"{name}.log", "wb") as out:
            # The child keeps its own copy of the descriptor; ours can close now.
            proc = subprocess.Popen(
                list(command),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.procs[name] = proc
        return proc

    def run(self, *args: str, limit_s: float = 60) -> str:
        done = subprocess.run(
            [*gengui_command(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=limit_s,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"gengui {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def check_alive(self) -> None:
        """A process that died mid-run makes every later number meaningless: stop."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"gengui {name} exited with {proc.returncode}")

    def stop(self, grace_s: float = 20) -> dict[str, int | None]:
        """SIGTERM everything, then SIGKILL what is still there after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                codes[name] = None  # killed: it did not stop by itself
        return codes

    def tail(self, chars: int = 2000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("*.log"))
        )


async def wait_ready(base_url: str, procs: Procs, limit_s: float = 60) -> None:
    """Until ``/readyz`` answers 200 (bounded); a dead process fails fast."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(limit_s):
        while True:
            procs.check_alive()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base_url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- CPU accounting


def _proc_stat(pid: int | str) -> tuple[str, int, float] | None:
    """(comm, parent pid, user+system CPU seconds) of one process, threads included."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cmdline(pid: int | str) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _machine_cpu_s() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK, values[7] / CLK_TCK, sum(values) / CLK_TCK


class CpuMeter:
    """CPU seconds of each gengui process, of the servers' share that is ours, and of
    the machine, so a phase can say where its CPU went and whether it had the box alone.
    """

    def __init__(self, procs: Procs, db_name: str, calls: ServerCalls | None = None) -> None:
        self.procs = procs
        self.db_name = db_name
        self.calls = calls

    def snapshot(self) -> dict[str, float]:
        snap: dict[str, float] = {}
        for name, proc in self.procs.procs.items():
            got = _proc_stat(proc.pid)
            snap[name] = got[2] if got else 0.0
        own = _proc_stat(os.getpid())
        snap["bench"] = own[2] if own else 0.0
        snap["postgres"] = snap["redis"] = 0.0
        stats = {
            int(e.name): _proc_stat(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
        }
        # Postgres: the backends of our database (their title names it), plus the
        # postmaster and auxiliary processes (checkpointer, walwriter...) of that server;
        # other databases' backends (a test suite next door) are not ours.
        postmasters: set[int] = set()
        for pid, st in stats.items():
            if st and st[0] == "postgres" and f" {self.db_name} " in _cmdline(pid):
                snap["postgres"] += st[2]
                postmasters.add(st[1])
        for pid, st in stats.items():
            if st is None:
                continue
            if pid in postmasters:
                snap["postgres"] += st[2]
            elif st[1] in postmasters:
                title = _cmdline(pid)
                is_backend = "(" in title or "[local]" in title
                if not is_backend and " autovacuum worker" not in title:
                    snap["postgres"] += st[2]
            elif st[0] in ("redis-server", "valkey-server"):
                snap["redis"] += st[2]  # all of it: Redis cannot tell us whose work it did
        busy, steal, total = _machine_cpu_s()
        snap["machine_busy"], snap["machine_steal"], snap["machine_total"] = busy, steal, total
        return snap


class ServerCalls:
    """What the servers were asked, counted by the servers: Postgres transactions of our
    database (``pg_stat_database``; one per statement outside a transaction block) and
    Redis commands by name (``INFO commandstats``; all of Redis's, like its CPU). Per
    generation these do not drift with the VM's speed as times do, and each is a round
    trip someone waited on and a wake-up of a server process: on this machine the cost
    of a request is more in the wake-ups than in the work."""

    # Postgres reports a backend's counts when it goes idle, at most once a second, and
    # what is left over 10 s later: a phase is counted between two quiet 11 s.
    PG_FLUSH_S = 11.0

    def __init__(self, admin_dsn: str, db_name: str, redis_url: str) -> None:
        self.admin_dsn = admin_dsn
        self.db_name = db_name
        self.redis_url = redis_url

    async def snapshot(self) -> dict[str, int]:
        from core.db import asyncpg_dsn

        conn = await asyncpg.connect(asyncpg_dsn(self.admin_dsn), timeout=10)
        try:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            xacts = await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                self.db_name,
            )
        finally:
            await conn.close(timeout=10)
        client = aioredis.from_url(self.redis_url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls = {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in stats.items()
            if isinstance(v, dict)
        }
        return {"postgres xacts": int(xacts or 0), **{f"redis {k}": n for k, n in calls.items()}}

    @staticmethod
    def per_generation(
        before: dict[str, int], after: dict[str, int], generations: int
    ) -> dict[str, float]:
        """Calls per generation: Postgres, Redis in all, then Redis's busiest commands
        (INFO, which the snapshots themselves send, left out)."""
        if generations <= 0:
            return {}
        delta = {k: after[k] - before.get(k, 0) for k in after}
        delta = {k: v for k, v in delta.items() if v > 0 and k != "redis info"}
        redis = {k: v for k, v in delta.items() if k.startswith("redis ")}
        out = {
            "postgres xacts": round(delta.get("postgres xacts", 0) / generations, 2),
            "redis calls": round(sum(redis.values()) / generations, 2),
        }
        for k, v in sorted(redis.items(), key=lambda kv: -kv[1])[:6]:
            out[k] = round(v / generations, 2)
        return out


def cpu_percent(
    before: dict[str, float], after: dict[str, float], wall_s: float
) -> dict[str, float]:
    """Percent of one core per process; ``other``: the rest of the machine's busy time,
    in the same unit; ``machine``/``machine_steal``: percent of all cores."""
    out = {
        k: round(100 * (after[k] - before.get(k, 0.0)) / wall_s, 1)
        for k in after
        if not k.startswith("machine")
    }
    total = after["machine_total"] - before["machine_total"]
    busy = after["machine_busy"] - before["machine_busy"]
    ncpu = os.cpu_count() or 1
    # Anything else on the box (another test run, profilers, kernel work no process is
    # charged for): large values mean the phase did not have the machine to itself.
    out["other"] = round(100 * busy / (total / ncpu) - sum(out.values()), 1)
    out["machine"] = round(100 * busy / total, 1)
    # Time the hypervisor gave to someone else: high steal makes every number noisier.
    out["machine_steal"] = round(
        100 * (after["machine_steal"] - before["machine_steal"]) / total, 1
    )
    return out


# --------------------------------------------------------------------------- profiling


class Profiler:
    """``py-spy record`` on every gengui process while the measured phases run."""

    def __init__(self, out_dir: Path, rate: int, flags: Sequence[str]) -> None:
        self.out_dir = out_dir
        self.rate = rate
        self.flags = list(flags)
        self.running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, procs: Procs) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if exe is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, proc in procs.procs.items():
            out = self.out_dir / f"{name}.folded"
            command = [exe, "record", "--pid", str(proc.pid), "--rate", str(self.rate)]
            command += [*self.flags, "--format", "raw", "--output", str(out)]
            spy = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.running[name] = (spy, out)

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop recording (SIGINT makes py-spy write its file) and summarize each profile."""
        for spy, _ in self.running.values():
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
        summary: dict[str, dict[str, Any]] = {}
        for name, (spy, out) in self.running.items():
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
            if out.exists():
                summary[name] = summarize_folded(out.read_text(errors="replace").splitlines())
        self.running.clear()
        return summary


# py-spy prints paths relative to sys.path, so gengui's own frames start with these.
GENGUI_PACKAGES = frozenset({"core", "consumers", "providers", "reconciler"})

# Leaf frames that are waits, not work: py-spy's idle detection misses these futex and
# epoll sleeps here, so they are dropped from the counts (and reported as idle).
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py:81)",  # thread pool waiting for work
    "EpollSelector.select (selectors.py:468)",  # event loop waiting for I/O
)


def _frame_name(frame: str) -> tuple[str, bool]:
    """``func (path/to/file.py:123)`` -> (``func (to/file.py)``, whether it is our code)."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    ours = bool(parts) and parts[0] in GENGUI_PACKAGES
    return f"{name} ({short})", ours


def summarize_folded(lines: Iterable[str], top: int = 15) -> dict[str, Any]:
    """Top self frames, and top inclusive frames of gengui's own code, as % of samples."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = idle = 0
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        if stack.endswith(IDLE_LEAVES):
            idle += count
            continue
        frames = [_frame_name(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += count
        # Lines of one function add up, so the same name may repeat down a stack.
        self_counts[frames[-1][0]] += count
        for name in {name for name, ours in frames if ours}:
            incl_counts[name] += count

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / max(total, 1), 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "self": pct(self_counts),
        "inclusive_gengui": pct(incl_counts),
    }


def summarize_cprofile(stats_file: Path, top: int = 15) -> dict[str, Any]:
    """Top functions of a cProfile dump by own time, and gengui's own functions by
    inclusive time, as % of the profiled total (``Procs.start_profiled`` runs)."""
    import pstats

    stats = pstats.Stats(str(stats_file))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = max(float(stats.total_tt), 1e-9)  # type: ignore[attr-defined]

    def name(func: tuple[str, int, str]) -> str:
        file, line, fn = func
        parts = Path(file).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else file
        return f"{fn} ({short}:{line})"

    def ours(file: str) -> bool:
        path = Path(file)
        if not path.is_absolute() or not path.is_relative_to(ROOT):
            return False
        return path.relative_to(ROOT).parts[0] in GENGUI_PACKAGES

    # (name, own seconds, inclusive seconds, calls, gengui's own code)
    rows: list[tuple[str, float, float, int, bool]] = [
        (name(f), tt, ct, nc, ours(f[0])) for f, (_cc, nc, tt, ct, _callers) in raw.items()
    ]

    def pick(inclusive: bool) -> list[tuple[str, float, int]]:
        chosen = [r for r in rows if r[4]] if inclusive else rows
        ordered = sorted(chosen, key=lambda r: r[2] if inclusive else r[1], reverse=True)
        return [
            (r[0], round(100 * (r[2] if inclusive else r[1]) / total, 1), r[3])
            for r in ordered[:top]
        ]

    return {"total_s": round(total, 2), "self": pick(False), "inclusive": pick(True)}


def print_cprofile(name: str, summary: dict[str, Any], top: int = 15) -> None:
    print(f"\ncProfile {name} ({summary['total_s']} s of CPU profiled; % of that, calls)")
    for title, key in (("top self", "self"), ("top inclusive, gengui code", "inclusive")):
        print(f"  {title}:")
        for frame, pct, calls in summary[key][:top]:
            print(f"    {pct:5.1f}%  {calls:>9}  {frame}")


# --------------------------------------------------------------------------- load


@dataclass
class Submission:
    """One POST: when it was meant to go, when it went, when the 202 came back."""

    index: int
    intended: float  # perf_counter; latency counts from here (open loop: the schedule)
    sent: float
    wall_sent: float  # time.time() at ``intended``, to compare with server timestamps
    answered: float = 0.0
    generation_id: str | None = None
    error: str | None = None


@dataclass
class Polled:
    """What the fallback GETs found: wall-clock completion / thumbnail times, failures."""

    completed: dict[str, float] = field(default_factory=dict)
    thumbs: dict[str, float] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    requests: int = 0


class Listener:
    """Receive times of every user notice under the run's prefix, by generation id."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.pattern = f"{prefix}:user:*"
        self.seen: dict[str, dict[str, float]] = {kind: {} for kind in EVENTS}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and wait for the server's confirmation, so no notice is missed."""
        pubsub = self.client.pubsub()
        await pubsub.psubscribe(self.pattern)
        async with asyncio.timeout(10):
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] == "psubscribe":
                    break
        self.task = asyncio.create_task(self._run(pubsub))

    async def _run(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None or msg["type"] != "pmessage":
                    continue
                now = time.perf_counter()
                event = orjson.loads(msg["data"])
                kind = event.get("type")
                if kind in self.seen:
                    self.seen[kind].setdefault(event["generation"]["id"], now)
        finally:
            await pubsub.aclose()

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.client.aclose()


# A minimal HTTP/1.1 client for the load generators: aiohttp's client costs ~3x its CPU
# per request (bench/README.md, `api.py`), and the load generator shares the machine.


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, Content-Length bodies
    only (every gengui JSON response has one). Cheap enough that the server, not the
    client, is what a run measures."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        eol = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : eol if eol >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("connection closed"))
        self.transport = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class RawClient:
    """Builds requests for one host and token, and keeps the connections it opened."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.host_header = f"Host: {host}:{port}\r\n".encode()
        self.conns: list[HttpConn] = []

    async def connect(self) -> HttpConn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(HttpConn, self.host, self.port)
        self.conns.append(conn)
        return conn

    def build(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.host_header + self.auth
        if body is None:
            return head + b"\r\n"
        return (
            head
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    async def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()


class Load:
    """Submits generations (``RawClient`` connections, one per POST in flight) and waits
    for them to finish (pub/sub notices; ``http`` for the rare polls)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        listener: Listener,
        args: argparse.Namespace,
        *,
        base_url: str,
    ):
        self.http = http
        self.listener = listener
        self.args = args
        self.run_tag = secrets.token_hex(3)
        url = urlsplit(base_url)
        token = http.headers["Authorization"].removeprefix("Bearer ")
        self.raw = RawClient(url.hostname or "127.0.0.1", url.port or 80, token)
        self.idle: list[HttpConn] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """One request on an idle keep-alive connection (a new one if none is idle)."""
        conn = self.idle.pop() if self.idle else await self.raw.connect()
        status, raw = await conn.request(self.raw.build("POST", path, body))
        self.idle.append(conn)  # only after a whole answer: a failed one is dropped
        return status, raw

    async def aclose(self) -> None:
        await self.raw.close()

    async def submit(self, index: int, intended: float | None = None) -> Submission:
        sent = time.perf_counter()
        intended = sent if intended is None else intended
        sub = Submission(index, intended, sent, time.time() - (sent - intended))
        body = {
            "prompt": f"bench {self.run_tag} #{index}: a lighthouse at dusk",
            "width": self.args.size,
            "height": self.args.size,
            "seed": index,
        }
        try:
            async with asyncio.timeout(60):
                status, raw = await self.post("/api/v1/generations", orjson.dumps(body))
            sub.answered = time.perf_counter()
            if status != 202:
                sub.error = f"HTTP {status}: {raw[:200]!r}"
            else:
                sub.generation_id = orjson.loads(raw)["id"]
        except (OSError, TimeoutError) as exc:
            sub.answered = time.perf_counter()
            sub.error = repr(exc)
        return sub

    async def closed_loop(self, n: int, concurrency: int) -> list[Submission]:
        """``concurrency`` submitters, each sending its next POST when the last answered."""
        indexes = iter(range(n))
        subs: list[Submission] = []

        async def submitter() -> None:
            for i in indexes:  # shared iterator: each index is taken once
                subs.append(await self.submit(i))

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
        return subs

    async def open_loop(self, rate: float, duration_s: float) -> list[Submission]:
        """POSTs on a fixed schedule whatever the answers do (no coordinated omission)."""
        count = max(1, round(rate * duration_s))
        start = time.perf_counter()
        tasks: list[asyncio.Task[Submission]] = []
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.submit(i, intended=due)))
        return list(await asyncio.gather(*tasks))

    async def _poll(self, ids: Sequence[str], polled: Polled) -> None:
        """The fallback path: read the resources pub/sub did not tell us about."""
        sem = asyncio.Semaphore(16)

        async def one(gid: str) -> None:
            async with sem:
                polled.requests += 1
                try:
                    async with self.http.get(f"/api/v1/generations/{gid}") as resp:
                        if resp.status != 200:
                            return
                        res = orjson.loads(await resp.read())
                except (aiohttp.ClientError, TimeoutError):
                    return  # still missing: the next poll asks again
            if res["status"] == "completed" and res["completed_at"]:
                # Server timestamps: the latency of these counts to the database's clock.
                polled.completed.setdefault(gid, _ts(res["completed_at"]))
                if res["thumbnail_url"]:
                    polled.thumbs.setdefault(gid, _ts(res["updated_at"]))
            elif res["status"] in ("failed", "cancelled"):
                polled.failed.add(gid)

        await asyncio.gather(*(one(g) for g in ids))

    async def wait_done(
        self, ids: Sequence[str], procs: Procs, limit_s: float, need_thumbnails: bool
    ) -> Polled:
        """Until every id completed or failed (and got its thumbnail), or ``limit_s``."""
        seen = self.listener.seen
        polled = Polled()
        waiting = set(ids)  # neither completed nor failed yet
        thumbless: set[str] = set()  # completed, thumbnail not seen yet
        last_left, last_change = -1, time.monotonic()
        next_report = time.monotonic() + 5
        deadline = time.monotonic() + limit_s
        while True:
            done = {
                g for g in waiting if g in seen["generation.completed"] or g in polled.completed
            }
            gone = {g for g in waiting if g in seen["generation.failed"] or g in polled.failed}
            waiting -= done | gone
            if need_thumbnails:
                thumbless |= done
                thumbless = {
                    g
                    for g in thumbless
                    if g not in seen["thumbnail.ready"] and g not in polled.thumbs
                }
            left = len(waiting) + len(thumbless)
            if not left:
                return polled
            now = time.monotonic()
            if now >= deadline:
                log(f"timed out: {len(waiting)} not completed, {len(thumbless)} without thumbnail")
                return polled
            procs.check_alive()
            if left != last_left:
                last_left, last_change = left, now
            if now >= next_report:
                log(
                    f"  {len(ids) - len(waiting)}/{len(ids)} completed, "
                    f"{len(thumbless)} awaiting thumbnails"
                )
                next_report = now + 5
            if now - last_change >= self.args.stall_s or not self.listener.alive:
                # Pub/sub is best effort: read the rows of whatever we have not heard about.
                await self._poll([*waiting, *thumbless], polled)
                last_change = time.monotonic()
            else:
                # The listener stamps each notice as it arrives; this loop only needs to
                # notice the end, so a coarse tick keeps its cost negligible.
                await asyncio.sleep(0.1)


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


# --------------------------------------------------------------------------- results


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99/max in milliseconds (values are seconds)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(1000 * ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(1000 * ordered[-1], 1)}


@dataclass
class PhaseResult:
    name: str
    mode: str  # "closed" or "rate"
    n: int
    concurrency: int | None
    rate: float | None
    thumbnails: bool
    wall_s: float = 0.0
    submit_s: float = 0.0
    submitted: int = 0
    submit_errors: int = 0
    completed: int = 0
    failed: int = 0
    not_completed: int = 0
    thumbnails_missing: int = 0
    polled: int = 0  # fallback GETs made (pub/sub missed something, or it never came)
    completed_per_s: float = 0.0
    submit_per_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    post_latency_ms: dict[str, float | None] = field(default_factory=dict)
    stages_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    thumbnail_latency_ms: dict[str, float | None] = field(default_factory=dict)
    send_lag_ms_max: float | None = None
    cpu_percent: dict[str, float] = field(default_factory=dict)
    calls_per_generation: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.submit_errors + self.failed + self.not_completed

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.thumbnails_missing == 0


async def run_phase(
    name: str,
    load: Load,
    procs: Procs,
    meter: CpuMeter,
    args: argparse.Namespace,
    *,
    rate: float | None = None,
    n: int = 0,
    concurrency: int = 0,
) -> PhaseResult:
    """Submit one batch, wait for all of it, and measure."""
    mode = "rate" if rate is not None else "closed"
    log(
        f"phase {name}: "
        + (
            f"{rate}/s for {args.duration}s"
            if rate
            else f"{n} generations, concurrency {concurrency}"
        )
    )
    calls_before: dict[str, int] = {}
    if meter.calls:
        await asyncio.sleep(meter.calls.PG_FLUSH_S)
        calls_before = await meter.calls.snapshot()
    cpu_before = meter.snapshot()
    t0 = time.perf_counter()  # the first POST goes now: every interval starts here
    if rate is not None:
        subs = await load.open_loop(rate, args.duration)
    else:
        subs = await load.closed_loop(n, concurrency)
    submit_end = time.perf_counter()
    accepted = [s for s in subs if s.generation_id]
    ids = [s.generation_id for s in accepted if s.generation_id]
    polled = await load.wait_done(ids, procs, args.timeout, need_thumbnails=not args.no_thumbnails)
    t_end = time.perf_counter()
    cpu_after = meter.snapshot()
    calls_after: dict[str, int] = {}
    if meter.calls:
        await asyncio.sleep(meter.calls.PG_FLUSH_S)
        calls_after = await meter.calls.snapshot()
    seen = load.listener.seen
    completed_at = seen["generation.completed"]
    # Convert pub/sub receive times and server timestamps (polled) to seconds since sent.
    latencies: list[float] = []
    thumb_lat: list[float] = []
    last_done = submit_end
    for s in accepted:
        gid = s.generation_id
        assert gid is not None
        if gid in completed_at:
            latencies.append(completed_at[gid] - s.intended)
            last_done = max(last_done, completed_at[gid])
        elif gid in polled.completed:
            latencies.append(polled.completed[gid] - s.wall_sent)
        if gid in seen["thumbnail.ready"]:
            thumb_lat.append(seen["thumbnail.ready"][gid] - s.intended)
        elif gid in polled.thumbs:
            thumb_lat.append(polled.thumbs[gid] - s.wall_sent)
    failed = {g for g in ids if g in seen["generation.failed"] or g in polled.failed}
    completed = len(latencies)
    # Wall: first POST to last completion; when some never completed (or only a poll
    # saw them), to the end of the wait.
    all_heard = completed == len(ids) and not polled.completed
    wall = (last_done if all_heard else t_end) - t0

    def stage(start: dict[str, float] | None, end: dict[str, float]) -> dict[str, float | None]:
        deltas = []
        for s in accepted:
            gid = s.generation_id
            assert gid is not None
            begin = s.intended if start is None else start.get(gid)
            if begin is not None and gid in end:
                deltas.append(end[gid] - begin)
        return percentiles(deltas)

    result = PhaseResult(
        name=name,
        mode=mode,
        n=len(subs),
        concurrency=concurrency if rate is None else None,
        rate=rate,
        thumbnails=not args.no_thumbnails,
        wall_s=round(wall, 3),
        submit_s=round(submit_end - t0, 3),
        submitted=len(accepted),
        submit_errors=len(subs) - len(accepted),
        completed=completed,
        failed=len(failed),
        not_completed=len(accepted) - completed - len(failed),
        thumbnails_missing=0 if args.no_thumbnails else completed - len(thumb_lat),
        polled=polled.requests,
        completed_per_s=round(completed / wall, 1) if wall > 0 else 0.0,
        submit_per_s=round(len(subs) / (submit_end - t0), 1),
        latency_ms=percentiles(latencies),
        post_latency_ms=percentiles([s.answered - s.sent for s in subs]),
        stages_ms={
            # Where a generation's time goes, by the notices each step publishes.
            "sent->submitted (api+dispatch)": stage(None, seen["generation.submitted"]),
            "submitted->processing (worker queue)": stage(
                seen["generation.submitted"], seen["generation.processing"]
            ),
            "processing->completed (render+status)": stage(
                seen["generation.processing"], completed_at
            ),
            # A job done within GENGUI_WORKER_PROCESSING_AFTER_S reports no processing.
            "submitted->completed (worker+status)": stage(
                seen["generation.submitted"], completed_at
            ),
            **(
                {"completed->thumbnail": stage(completed_at, seen["thumbnail.ready"])}
                if not args.no_thumbnails
                else {}
            ),
        },
        thumbnail_latency_ms=percentiles(thumb_lat) if not args.no_thumbnails else {},
        send_lag_ms_max=(
            round(1000 * max(s.sent - s.intended for s in subs), 1) if rate is not None else None
        ),
        # Over the whole phase, thumbnail drain included.
        cpu_percent=cpu_percent(cpu_before, cpu_after, t_end - t0),
        calls_per_generation=ServerCalls.per_generation(calls_before, calls_after, len(ids)),
        errors=sorted({s.error for s in subs if s.error})[:5],
    )
    log(
        f"phase {name}: {result.completed}/{result.n} completed in {result.wall_s:.1f}s, "
        f"p50 {result.latency_ms['p50']} ms, p99 {result.latency_ms['p99']} ms"
    )
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_table(results: Sequence[PhaseResult], meta: dict[str, Any]) -> None:
    """The result table on stdout, then stage and CPU breakdowns."""
    print()
    git = meta["git"]
    commit = git.get("commit", "?")[:8] + ("+dirty" if git.get("dirty") else "")
    print(
        f"gengui e2e benchmark, {meta['started_at']}  "
        f"({meta['machine']['nproc']} cores, {meta['machine']['cpu']}; "
        f"{meta['servers']['postgres_version']} / {meta['servers']['redis_version']}; "
        f"workers {meta['args']['workers']}, size {meta['args']['size']}px; "
        f"commit {commit})"
    )
    head = (
        f"{'phase':<14}{'N':>6}{'conc/rate':>11}{'thumbs':>7}{'wall s':>8}{'done/s':>8}"
        f"{'submit/s':>9}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}{'thumb p99':>10}"
        f"{'fail':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        load = f"c={r.concurrency}" if r.mode == "closed" else f"{r.rate:g}/s"
        lat = r.latency_ms
        print(
            f"{r.name:<14}{r.n:>6}{load:>11}{'on' if r.thumbnails else 'off':>7}"
            f"{r.wall_s:>8.1f}{r.completed_per_s:>8.1f}{r.submit_per_s:>9.1f}"
            f"{_fmt(lat['p50']):>7}{_fmt(lat['p90']):>7}{_fmt(lat['p99']):>7}"
            f"{_fmt(lat['max']):>7}{_fmt(r.thumbnail_latency_ms.get('p99')):>10}"
            f"{r.failures:>6}"
        )
    print(
        "latencies in ms, from POST sent to generation.completed received "
        "(thumb: to thumbnail.ready); done/s = completed / wall"
    )
    for r in results:
        print(
            f"\n{r.name}: POST p50/p99 {_fmt(r.post_latency_ms['p50'])}/"
            f"{_fmt(r.post_latency_ms['p99'])} ms"
            + (
                f", max send lag {r.send_lag_ms_max:.0f} ms"
                if r.send_lag_ms_max is not None
                else ""
            )
            + (f", polled {r.polled}" if r.polled else "")
            + (f", thumbnails missing {r.thumbnails_missing}" if r.thumbnails_missing else "")
        )
        for stage_name, p in r.stages_ms.items():
            print(
                f"  {stage_name:<40} p50 {_fmt(p['p50']):>6}  p99 {_fmt(p['p99']):>6}  "
                f"max {_fmt(p['max']):>6}"
            )
        cpu = r.cpu_percent
        print(
            "  cpu % of one core: "
            + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if not k.startswith("machine"))
            + f"; machine busy {cpu['machine']:.0f}% of all cores"
            + f" (steal {cpu['machine_steal']:.0f}%)"
        )
        if r.calls_per_generation:
            print(
                "  server calls per generation: "
                + ", ".join(f"{k} {v:g}" for k, v in r.calls_per_generation.items())
            )
        if cpu["other"] > 25:
            print(
                f"  warning: {cpu['other']:.0f}% of a core went to other work on this machine"
                " during the phase: these figures are not from an otherwise idle box"
            )
        for err in r.errors:
            print(f"  error: {err}")


def calibrate() -> dict[str, float]:
    """Milliseconds for fixed work, now: this VM's CPU speed drifts (neighbours on the
    host, not always reported as steal), so runs compare only at similar values."""
    from providers.local.engines.placeholder import render_placeholder

    render_placeholder("warm-up", None, 256, 256, 0)
    started = time.perf_counter()
    for i in range(100):
        render_placeholder(f"calibrate {i}", None, 256, 256, i)
    render_ms = (time.perf_counter() - started) * 10  # per image
    started = time.perf_counter()
    sum(i * i for i in range(1_000_000))
    python_ms = (time.perf_counter() - started) * 1000
    return {"render_256px_ms": round(render_ms, 2), "python_loop_ms": round(python_ms, 1)}


async def final_state(database_url: str, redis_url: str, prefix: str) -> dict[str, Any]:
    """Generations by status, completed ones without thumbnail, dead letters, pending."""
    from core.db import asyncpg_dsn

    state: dict[str, Any] = {}
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM generations GROUP BY status")
        state["statuses"] = {r["status"]: r["n"] for r in rows}
        state["completed_without_thumbnail"] = await conn.fetchval(
            "SELECT count(*) FROM generations WHERE status = 'completed' AND thumbnail_key IS NULL"
        )
    finally:
        await conn.close(timeout=10)
    client = aioredis.Redis.from_url(redis_url)
    try:
        state["dead_letters"] = await client.xlen(f"{prefix}:dead")
        pending: dict[str, int] = {}
        async for key in client.scan_iter(match=f"{prefix}:*", _type="stream"):
            for group in await client.xinfo_groups(key):
                pending[f"{key.decode()}/{group['name'].decode()}"] = group["pending"]
        state["pending"] = pending
    finally:
        await client.aclose()
    return state


def git_info() -> dict[str, Any]:
    """The commit measured, and whether the tree had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(status.strip())}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gib = round(int(first.split()[1]) / 1024 / 1024, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="closed loop: generations to submit")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: POSTs in flight")
    p.add_argument(
        "--engine",
        choices=["placeholder", "instant"],
        default="placeholder",
        help="the workers' engine: placeholder (a 256 px picture) or instant (one tiny PNG)",
    )
    p.add_argument("--rate", type=float, help="open loop: POSTs per second")
    p.add_argument("--rates", help="open loop: comma-separated rates, run in sequence")
    p.add_argument("--duration", type=float, default=10.0, help="open loop: seconds per rate")
    p.add_argument(
        "--no-thumbnails", action="store_true", help="run consumers with --only dispatch,status"
    )
    p.add_argument("--workers", type=int, default=1, help="gengui worker processes")
    p.add_argument(
        "--provider",
        default="local",
        choices=["local", "runpod", "replicate", "gemini", "openai"],
        help="send every generation to this provider; all but local are served by "
        "`gengui mock-providers` (started by the bench)",
    )
    p.add_argument(
        "--mock-latency", type=float, default=0.0, help="seconds each mock provider job takes"
    )
    p.add_argument("--reconciler", action="store_true", help="also run gengui reconciler")
    p.add_argument("--size", type=int, default=256, help="width = height of each image")
    p.add_argument("--warmup", type=int, default=20, help="generations before measuring")
    p.add_argument(
        "--calls",
        action="store_true",
        help="count the servers' calls per generation (Postgres transactions, Redis commands);"
        " adds 22 s of quiet around each phase",
    )
    p.add_argument(
        "--seed-rows",
        type=int,
        default=100_000,
        help="finished rows loaded (and analysed) before the run, as in a table that has "
        "run for a while; 0 starts from an empty, never-analysed table",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a phase's generations after its last POST",
    )
    p.add_argument(
        "--stall-s",
        type=float,
        default=5.0,
        help="no notice for this long: poll the API for the missing ones",
    )
    p.add_argument("--max-runtime", type=float, default=3600.0, help="hard limit for the run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GENGUI_X=V",
        help="extra setting for every gengui process (repeatable)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record every gengui process during the measured phases",
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument(
        "--profile-flags",
        default="--nonblocking",
        help="extra py-spy record flags; the default never pauses the target, so profiling\n"
        "barely moves the numbers; --profile-flags=--gil counts only samples holding the GIL",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, images)")
    args = p.parse_args(argv)
    if args.rate is not None and args.rates:
        p.error("give --rate or --rates, not both")
    check_settings(p, args.set)
    return args


@contextlib.asynccontextmanager
async def user_session(
    procs: Procs, base_url: str, email: str, concurrency: int
) -> AsyncIterator[aiohttp.ClientSession]:
    """Once the API answers: a user made with ``gengui users create`` and an HTTP session
    carrying its token, sized for ``concurrency`` requests in flight."""
    await wait_ready(base_url, procs)
    out = await asyncio.to_thread(procs.run, "users", "create", email)
    api_token = out.strip().splitlines()[-1]
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1024))
    async with aiohttp.ClientSession(
        base_url,
        headers={"Authorization": f"Bearer {api_token}"},
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as http:
        yield http


async def warm_up(load: Load, procs: Procs, meter: CpuMeter, args: argparse.Namespace) -> None:
    """``--warmup`` generations, not reported; a failed warm-up stops the run."""
    if not args.warmup:
        return
    warm = await run_phase(
        "warmup", load, procs, meter, args, n=args.warmup, concurrency=min(4, args.warmup)
    )
    if not warm.ok:
        raise BenchError(
            f"warm-up failed: {warm.completed}/{warm.n} completed, "
            f"{warm.thumbnails_missing} without thumbnail, errors {warm.errors}"
        )


def phase_plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(name, run_phase keyword arguments) of each measured phase, in order."""
    rates = (
        [args.rate]
        if args.rate is not None
        else ([float(r) for r in args.rates.split(",") if r.strip()] if args.rates else [])
    )
    if rates:
        return [(f"rate-{r:g}", {"rate": r}) for r in rates]
    return [("closed", {"n": args.n, "concurrency": args.concurrency})]


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-"))
    token = secrets.token_hex(4)
    db_name = f"gengui_bench_{token}"
    prefix = f"bench{token}"
    results: list[PhaseResult] = []
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
    }
    async with contextlib.AsyncExitStack() as stack:
        if args.keep:
            log(f"keeping {tmp}")
        else:
            # At exit, not now: embedded servers stop in their own atexit hooks, which
            # need their data dirs, and run first (atexit is LIFO, ours is registered first).
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        meta["calibration_start"] = calibrate()
        servers = await asyncio.to_thread(start_servers, tmp)
        versions = await server_versions(servers)
        meta["servers"] = {
            "embedded": servers.embedded,
            "postgres_version": f"PostgreSQL {versions['postgres']}",
            "redis_version": versions["redis"],
        }
        database_url = await fresh_database(stack, servers, db_name)
        log(f"database {db_name}, stream prefix {prefix}")
        if args.seed_rows:
            from seed import bulk_load

            meta["seed"] = await bulk_load(database_url, None, args.seed_rows, users=100)
            log(f"seeded {args.seed_rows} finished rows: {meta['seed']}")

        stack.push_async_callback(drop_prefix, servers.redis_url, prefix)

        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = process_env(database_url, servers.redis_url, prefix, tmp / "data", port)
        mock_port = free_port()
        if args.provider != "local":
            env.update(mock_provider_env(f"http://127.0.0.1:{mock_port}", args.provider, base_url))
        env.update(item.split("=", 1) for item in args.set)
        logs = tmp / "logs"
        logs.mkdir()
        procs = Procs(env, logs)
        meter = CpuMeter(procs, db_name, ServerCalls(servers.admin_dsn, db_name, servers.redis_url))

        async def inspect_final() -> None:
            # After the processes stopped, before cleanup: what the run left behind.
            try:
                meta["final_state"] = await final_state(database_url, servers.redis_url, prefix)
            except Exception as exc:  # a report, not a reason to skip the cleanup after it
                log(f"could not read the final state: {exc!r}")

        stack.push_async_callback(inspect_final)

        async def stop_procs() -> None:
            codes = await asyncio.to_thread(procs.stop)
            meta["exit_codes"] = codes
            if any(c != 0 for c in codes.values()):
                log(f"processes did not all exit cleanly: {codes}")

        stack.push_async_callback(stop_procs)
        listener = Listener(servers.redis_url, prefix)
        stack.push_async_callback(listener.close)
        # Subscribe before anything can publish a notice.
        await listener.start()

        if args.provider != "local":
            procs.start(
                "mock",
                "mock-providers",
                "--port",
                str(mock_port),
                "--latency",
                str(args.mock_latency),
            )
        procs.start("api", "api")
        procs.start(
            "consumers",
            "consumers",
            *(["--only", "dispatch,status,results,cancels,hosted"] if args.no_thumbnails else []),
        )
        for i in range(args.workers if args.provider == "local" else 0):
            procs.start(
                "worker" if args.workers == 1 else f"worker{i + 1}",
                "worker",
                "--engine",
                args.engine,
            )
        if args.reconciler:
            procs.start("reconciler", "reconciler")
        try:
            async with (
                user_session(
                    procs, base_url, f"bench-{token}@example.com", args.concurrency
                ) as http,
                contextlib.aclosing(Load(http, listener, args, base_url=base_url)) as load,
            ):
                await warm_up(load, procs, meter, args)
                profiler = Profiler(
                    RESULTS_DIR / f"e2e-{stamp}-profile",
                    args.profile_rate,
                    args.profile_flags.split(),
                )
                if args.profile:
                    await asyncio.to_thread(profiler.start, procs)
                try:
                    for name, kwargs in phase_plan(args):
                        results.append(await run_phase(name, load, procs, meter, args, **kwargs))
                finally:
                    if args.profile:
                        meta["profile"] = await asyncio.to_thread(profiler.stop)
        except BaseException:
            log("run failed; process logs:\n" + procs.tail())
            raise
    meta["calibration_end"] = calibrate()
    print_table(results, meta)
    print(
        f"\ncalibration (fixed work, ms; start -> end): "
        f"render 256px {meta['calibration_start']['render_256px_ms']} -> "
        f"{meta['calibration_end']['render_256px_ms']}, "
        f"python loop {meta['calibration_start']['python_loop_ms']} -> "
        f"{meta['calibration_end']['python_loop_ms']}"
    )
    print(f"exit codes: {meta.get('exit_codes')}")
    print(f"final state: {meta.get('final_state')}")
    if "profile" in meta:
        print_profile(meta["profile"])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"e2e-{stamp}.json"
    out.write_bytes(
        orjson.dumps(
            {**meta, "results": [asdict(r) for r in results]},
            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
            default=str,
        )
    )
    print(f"\nresults: {out.relative_to(ROOT)}")
    problems = [f"phase {r.name}: {r.failures} failed" for r in results if not r.ok]
    problems += [f"{k} exited with {v}" for k, v in meta.get("exit_codes", {}).items() if v != 0]
    final = meta.get("final_state", {})
    if final.get("dead_letters"):
        problems.append(f"{final['dead_letters']} dead letters")
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


def print_profile(profile: dict[str, dict[str, Any]], top: int = 8) -> None:
    """Where each process spent its CPU, by py-spy samples."""
    for name, summary in profile.items():
        print(
            f"\nprofile {name} ({summary['samples']} busy samples, "
            f"{summary['idle_samples_dropped']} idle dropped)"
        )
        print("  top self:")
        for frame, pct in summary["self"][:top]:
            print(f"    {pct:5.1f}%  {frame}")
        print("  top inclusive, gengui code:")
        for frame, pct in summary["inclusive_gengui"][:top]:
            print(f"    {pct:5.1f}%  {frame}")


def check_settings(p: argparse.ArgumentParser, items: Sequence[str]) -> None:
    """``--set`` values must read GENGUI_NAME=VALUE."""
    for item in items:
        if not item.startswith("GENGUI_") or "=" not in item:
            p.error(f"--set takes GENGUI_NAME=VALUE, got {item!r}")


def run_bounded(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """``run(args)`` under ``--max-runtime`` (where the script has one); a timeout or a
    BenchError is exit code 1."""

    async def bounded() -> int:
        async with asyncio.timeout(getattr(args, "max_runtime", None)):
            return await run(args)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        log(f"gave up after --max-runtime {args.max_runtime}s")
        return 1
    except BenchError as exc:
        log(f"error: {exc}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
