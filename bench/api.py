"""API benchmark: one ``gengui api`` process, ``POST`` and ``GET /api/v1/generations``.

    .venv/bin/python bench/api.py                       # the defaults below, ~2 min
    .venv/bin/python bench/api.py --rows 100000 --rates 500,1000 --client aiohttp

Phases, in order, against one API process (no consumers: POSTs insert a row, then one
Redis script call, shared by the POSTs of one event-loop turn, logs the queued notice and
XADDs to the requested stream, which nothing reads during the run):

1. bulk load ``--rows`` finished generations spread over ``--users`` users (one of them,
   the *list user*, owns ``--list-user-rows``), then ``VACUUM ANALYZE``;
2. ``POST /api/v1/generations`` closed loop: ``--connections`` keep-alive connections,
   each sending its next request when the last answered, for ``--closed-s`` seconds
   (max req/s);
3. the same POST open loop at each of ``--rates`` req/s for ``--rate-s`` seconds: the
   clock of each request starts at its scheduled time (no coordinated omission);
4. ``GET /api/v1/generations?limit=50`` (the list user's newest page): one connection
   (latency), then ``--connections`` (req/s);
5. a deep keyset walk: every page of the list user, following ``next_cursor``; latency
   by depth;
6. ``?limit=50&status=cancelled`` (2 % of the rows): a filter the index does not cover.

Requests come from a separate load-generator process (this script with ``--loadgen``):
by default a minimal HTTP/1.1 client on asyncio protocols (``--client raw``, a few tens
of microseconds of CPU per request), or an ``aiohttp.ClientSession`` (``--client
aiohttp``, several times that) to show how much the client costs. Its CPU is reported
beside the API's, Postgres's and Redis's: on two cores the load generator competes
with the server it measures.

Servers, database (``gengui_bench_<random>``, created, migrated, dropped) and stream
prefix as in ``bench/e2e.py``. Results: stdout and ``bench/results/api-<ts>.json``.
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
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    ROOT,
    BenchError,
    CpuMeter,
    HttpConn,
    Procs,
    RawClient,
    calibrate,
    check_settings,
    cpu_percent,
    drop_prefix,
    free_port,
    fresh_database,
    git_info,
    log,
    machine_info,
    percentiles,
    print_calibration,
    print_cprofile,
    process_env,
    run_bounded,
    server_versions,
    start_servers,
    summarize_cprofile,
    wait_ready,
    write_results,
)
from seed import PROMPT_TAIL, bulk_load

PAGE = 50
SCRIPT = str(Path(__file__).resolve())


# --------------------------------------------------------------------------- load generator
# Runs in its own process (``--loadgen SPEC``): it prints one JSON object on stdout.


class AiohttpClient:
    """The same requests through ``aiohttp.ClientSession``, to measure what it costs."""

    def __init__(self, base: str, token: str, limit: int) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            base,
            headers={"Authorization": f"Bearer {token}"},
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def send(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self.session.request(method, path, data=body, headers=headers) as resp:
            return resp.status, await resp.read()

    async def close(self) -> None:
        await self.session.close()


def create_body(i: int, tag: str) -> bytes:
    return orjson.dumps(
        {"prompt": f"bench {tag} #{i}: {PROMPT_TAIL}", "width": 256, "height": 256, "seed": i}
    )


class Requester:
    """Hands out connections (raw) or a shared session (aiohttp) and records results."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind = spec["client"]
        self.method = spec["method"]
        self.path = spec["path"]
        self.create = spec.get("create", False)
        self.tag = secrets.token_hex(3)
        self.counter = 0
        self.raw = RawClient(spec["host"], spec["port"], spec["token"])
        self.aio: AiohttpClient | None = None

    async def start(self) -> None:
        if self.kind == "aiohttp":
            self.aio = AiohttpClient(
                f"http://{self.spec['host']}:{self.spec['port']}", self.spec["token"], 4096
            )

    def body(self) -> bytes | None:
        if not self.create:
            return None
        self.counter += 1
        return create_body(self.counter, self.tag)

    async def send(self, conn: HttpConn | None, path: str | None = None) -> tuple[int, bytes]:
        body = self.body()
        if self.aio is not None:
            return await self.aio.send(self.method, path or self.path, body)
        assert conn is not None
        return await conn.request(self.raw.build(self.method, path or self.path, body))

    async def close(self) -> None:
        await self.raw.close()
        if self.aio is not None:
            await self.aio.close()


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def loadgen_closed(spec: dict[str, Any]) -> dict[str, Any]:
    """``connections`` callers back to back for ``warmup_s`` + ``duration_s``; only
    requests sent and answered inside the measured window count."""
    req = Requester(spec)
    await req.start()
    conns = [await req.raw.connect() for _ in range(spec["connections"])]
    start = time.perf_counter()
    window_start = start + spec["warmup_s"]
    window_end = window_start + spec["duration_s"]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    cpu0 = 0.0

    async def caller(conn: HttpConn) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= window_end:
                return
            try:
                status, _ = await req.send(conn)
            except (OSError, ConnectionError) as exc:
                errors.append(repr(exc))
                return
            t1 = time.perf_counter()
            if t0 >= window_start and t1 <= window_end:
                latencies.append(t1 - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

    async def cpu_mark() -> None:
        nonlocal cpu0
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        cpu0 = _cpu_s()

    marker = asyncio.create_task(cpu_mark())
    await asyncio.gather(*(caller(c) for c in conns))
    await marker
    cpu = _cpu_s() - cpu0
    await req.close()
    return {
        "requests": len(latencies),
        "per_s": round(len(latencies) / spec["duration_s"], 1),
        "latency_ms": percentiles(latencies),
        "statuses": statuses,
        "errors": errors[:5],
        "loadgen_cpu_s": round(cpu, 3),
        "window_s": spec["duration_s"],
    }


async def loadgen_open(spec: dict[str, Any]) -> dict[str, Any]:
    """``rate`` requests per second on a fixed schedule for ``duration_s``; each takes an
    idle connection or opens one (up to ``max_connections``, then it waits for one)."""
    req = Requester(spec)
    await req.start()
    rate, duration = spec["rate"], spec["duration_s"]
    count = max(1, round(rate * duration))
    idle: deque[HttpConn] = deque([await req.raw.connect() for _ in range(spec["connections"])])
    opened = len(idle)
    freed = asyncio.Event()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    send_lag = 0.0

    async def one(due: float) -> None:
        nonlocal opened, send_lag
        conn: HttpConn | None = None
        if req.aio is None:
            while not idle:
                if opened < spec["max_connections"]:
                    opened += 1
                    idle.append(await req.raw.connect())
                    break
                freed.clear()
                await freed.wait()
            conn = idle.popleft()
        send_lag = max(send_lag, time.perf_counter() - due)
        try:
            status, _ = await req.send(conn)
        except (OSError, ConnectionError) as exc:
            errors.append(repr(exc))
            return
        latencies.append(time.perf_counter() - due)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if conn is not None:
            idle.append(conn)
            freed.set()

    cpu0 = _cpu_s()
    start = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    cpu = _cpu_s() - cpu0
    await req.close()
    return {
        "requests": len(latencies),
        "rate": rate,
        "per_s": round(len(latencies) / wall, 1),
        "latency_ms": percentiles(latencies),
        "statuses": statuses,
        "errors": errors[:5],
        "send_lag_ms_max": round(1000 * send_lag, 1),
        "connections_opened": opened,
        "loadgen_cpu_s": round(cpu, 3),
        "window_s": round(wall, 3),
    }


async def loadgen_walk(spec: dict[str, Any]) -> dict[str, Any]:
    """Every page of the list, one after the other, following ``next_cursor``."""
    req = Requester(spec)
    await req.start()
    conn = await req.raw.connect()
    cpu0 = _cpu_s()
    start = time.perf_counter()
    pages: list[float] = []
    items = 0
    path = spec["path"]
    statuses: dict[str, int] = {}
    while True:
        t0 = time.perf_counter()
        status, body = await req.send(conn, path)
        pages.append(time.perf_counter() - t0)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status != 200:
            break
        page = orjson.loads(body)
        items += len(page["items"])
        if not page["next_cursor"]:
            break
        path = f"{spec['path']}&cursor={quote(page['next_cursor'])}"
    wall = time.perf_counter() - start
    cpu = _cpu_s() - cpu0
    await req.close()
    tenth = max(1, len(pages) // 10)
    return {
        "requests": len(pages),
        "items": items,
        "per_s": round(len(pages) / wall, 1),
        "latency_ms": percentiles(pages),
        "first_tenth_ms": percentiles(pages[:tenth]),
        "last_tenth_ms": percentiles(pages[-tenth:]),
        "statuses": statuses,
        "errors": [],
        "loadgen_cpu_s": round(cpu, 3),
        "window_s": round(wall, 3),
    }


def loadgen_main(spec_json: str) -> None:
    spec = orjson.loads(spec_json)
    runner = {"closed": loadgen_closed, "open": loadgen_open, "walk": loadgen_walk}[spec["mode"]]
    print(orjson.dumps(asyncio.run(runner(spec))).decode(), flush=True)


# --------------------------------------------------------------------------- phases


async def run_loadgen(spec: dict[str, Any], meter: CpuMeter, limit_s: float) -> dict[str, Any]:
    """One load-generator process; CPU of everything over its run, the load generator's
    own (from its report) taken out of ``other``."""
    before = meter.snapshot()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--loadgen",
        orjson.dumps(spec).decode(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"load generator ran past {limit_s:.0f}s: {spec['name']}") from None
    wall = time.perf_counter() - t0
    after = meter.snapshot()
    if proc.returncode != 0:
        raise BenchError(f"load generator failed ({spec['name']}): {err.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(out)
    cpu = cpu_percent(before, after, wall)
    # The load generator's whole-process CPU over the same wall time (start-up included).
    lg = round(100 * result["loadgen_cpu_s"] / result["window_s"], 1)
    cpu["loadgen"] = lg
    cpu["other"] = round(cpu["other"] - 100 * result["loadgen_cpu_s"] / wall, 1)
    result["cpu_percent"] = cpu
    # The steadier figure on a shared box: API CPU per request answered, in µs.
    if result["per_s"]:
        result["api_cpu_us_per_request"] = round(cpu.get("api", 0) * 10_000 / result["per_s"])
    result["name"] = spec["name"]
    result["client"] = spec["client"]
    return result


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) and v < 10 else f"{v:.0f}"


def print_phase(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    bad = sum(n for s, n in r["statuses"].items() if not str(s).startswith("2"))
    cpu = r["cpu_percent"]
    print(
        f"{r['name']:<26}{r['requests']:>8}{r['per_s']:>9.0f}"
        f"{_fmt(lat['p50']):>8}{_fmt(lat['p90']):>8}{_fmt(lat['p99']):>8}{_fmt(lat['max']):>8}"
        f"{bad + len(r['errors']):>6}{r.get('api_cpu_us_per_request', '-'):>8}   "
        f"api {cpu.get('api', 0):.0f} pg {cpu.get('postgres', 0):.0f} "
        f"redis {cpu.get('redis', 0):.0f} loadgen {cpu['loadgen']:.0f} "
        f"other {cpu['other']:.0f} (busy {cpu['machine']:.0f}%)"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="finished rows to bulk-load")
    p.add_argument("--users", type=int, default=1000, help="users the rows are spread over")
    p.add_argument(
        "--list-user-rows", type=int, default=10_000, help="rows of the user whose list is read"
    )
    p.add_argument("--connections", type=int, default=32, help="closed loop: connections")
    p.add_argument("--closed-s", type=float, default=10.0, help="closed loop: measured seconds")
    p.add_argument("--warmup-s", type=float, default=2.0, help="closed loop: unmeasured seconds")
    p.add_argument("--rates", default="500,1000,1500", help="open loop POST rates (req/s)")
    p.add_argument("--rate-s", type=float, default=5.0, help="open loop: seconds per rate")
    p.add_argument("--list-s", type=float, default=5.0, help="list phases: seconds each")
    p.add_argument(
        "--max-connections", type=int, default=512, help="open loop: most connections opened"
    )
    p.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="load generator's HTTP client (raw: asyncio protocol, far cheaper)",
    )
    p.add_argument(
        "--cprofile",
        action="store_true",
        help="run the API under cProfile (slower: compare shares, not rates)",
    )
    p.add_argument("--skip-list", action="store_true", help="POST phases only, no bulk load")
    p.add_argument(
        "--set", action="append", default=[], metavar="GENGUI_X=V", help="extra API setting"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (API log)")
    args = p.parse_args(argv)
    check_settings(p, args.set)
    if args.list_user_rows > args.rows:
        p.error("--list-user-rows must not exceed --rows")
    return args


async def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-bench-api-"))
    token = secrets.token_hex(4)
    db_name = f"gengui_bench_{token}"
    prefix = f"bench{token}"
    meta: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_info(),
        "args": vars(args),
    }
    phases: list[dict[str, Any]] = []
    if args.keep:
        log(f"keeping {tmp}")
    else:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    meta["calibration_start"] = calibrate()
    async with contextlib.AsyncExitStack() as stack:
        servers = await asyncio.to_thread(start_servers, tmp)
        versions = await server_versions(servers)
        meta["servers"] = versions
        database_url = await fresh_database(stack, servers, db_name)
        log(f"database {db_name}, stream prefix {prefix}")

        stack.push_async_callback(drop_prefix, servers.redis_url, prefix)
        port = free_port()
        env = process_env(database_url, servers.redis_url, prefix, tmp / "data", port)
        env.update(item.split("=", 1) for item in args.set)
        (tmp / "logs").mkdir()
        procs = Procs(env, tmp / "logs")
        meter = CpuMeter(procs, db_name)

        async def stop_procs() -> None:
            meta["exit_codes"] = await asyncio.to_thread(procs.stop)

        stack.push_async_callback(stop_procs)
        stats_file = tmp / "api.prof"
        if args.cprofile:
            procs.start_profiled("api", stats_file, "api")
        else:
            procs.start("api", "api")
        try:
            await wait_ready(f"http://127.0.0.1:{port}", procs)
            tokens = {}
            for who in ("post", "list"):
                out = await asyncio.to_thread(
                    procs.run, "users", "create", f"{who}-{token}@example.com"
                )
                tokens[who] = out.strip().splitlines()[-1]
            base = {"host": "127.0.0.1", "port": port, "client": args.client}
            post = {**base, "token": tokens["post"], "method": "POST", "create": True}
            post["path"] = "/api/v1/generations"
            limit = 120 + args.closed_s + args.rate_s * 4

            if not args.skip_list:
                from core.db import asyncpg_dsn

                conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
                try:
                    list_user = await conn.fetchval(
                        "SELECT id FROM users WHERE email = $1", f"list-{token}@example.com"
                    )
                finally:
                    await conn.close()
                log(f"bulk-loading {args.rows} rows over {args.users} users")
                meta["bulk_load"] = await bulk_load(
                    database_url, list_user, args.rows, args.users, args.list_user_rows
                )
                log(f"bulk load: {meta['bulk_load']}")

            log("POST closed loop")
            phases.append(
                await run_loadgen(
                    {
                        **post,
                        "name": f"POST closed c={args.connections}",
                        "mode": "closed",
                        "connections": args.connections,
                        "duration_s": args.closed_s,
                        "warmup_s": args.warmup_s,
                    },
                    meter,
                    limit,
                )
            )
            procs.check_alive()
            for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
                log(f"POST open loop {rate:g}/s")
                phases.append(
                    await run_loadgen(
                        {
                            **post,
                            "name": f"POST open {rate:g}/s",
                            "mode": "open",
                            "rate": rate,
                            "connections": 16,
                            "max_connections": args.max_connections,
                            "duration_s": args.rate_s,
                        },
                        meter,
                        limit,
                    )
                )
                procs.check_alive()
            if not args.skip_list:
                get = {**base, "token": tokens["list"], "method": "GET"}
                first = f"/api/v1/generations?limit={PAGE}"
                for conns in (1, args.connections):
                    log(f"GET list, {conns} connection(s)")
                    phases.append(
                        await run_loadgen(
                            {
                                **get,
                                "path": first,
                                "name": f"GET list c={conns}",
                                "mode": "closed",
                                "connections": conns,
                                "duration_s": args.list_s,
                                "warmup_s": 1.0,
                            },
                            meter,
                            limit,
                        )
                    )
                log("GET list, keyset walk")
                phases.append(
                    await run_loadgen(
                        {**get, "path": first, "name": "GET list walk (all pages)", "mode": "walk"},
                        meter,
                        limit,
                    )
                )
                log("GET list status=cancelled")
                phases.append(
                    await run_loadgen(
                        {
                            **get,
                            "path": f"{first}&status=cancelled",
                            "name": "GET list status=cancelled",
                            "mode": "closed",
                            "connections": 1,
                            "duration_s": args.list_s,
                            "warmup_s": 1.0,
                        },
                        meter,
                        limit,
                    )
                )
            procs.check_alive()
        except BaseException:
            log("run failed; process logs:\n" + procs.tail())
            raise
    if args.cprofile and stats_file.exists():
        meta["cprofile"] = summarize_cprofile(stats_file, top=25)
    meta["calibration_end"] = calibrate()
    print()
    git = meta["git"]
    commit = git.get("commit", "?")[:8] + ("+dirty" if git.get("dirty") else "")
    print(
        f"gengui API benchmark, {meta['started_at']} ({meta['machine']['nproc']} cores, "
        f"{meta['machine']['cpu']}; PostgreSQL {versions['postgres']} / {versions['redis']}; "
        f"client {args.client}; commit {commit}"
        f"{'; API UNDER cProfile' if args.cprofile else ''})"
    )
    if "bulk_load" in meta:
        b = meta["bulk_load"]
        print(
            f"table: {args.rows} rows over {args.users} users "
            f"(list user {args.list_user_rows}), {b['table_mb']} MB; loaded in "
            f"{b['rows_s']} s, VACUUM ANALYZE {b['vacuum_analyze_s']} s"
        )
    head = (
        f"{'phase':<26}{'N':>8}{'req/s':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'bad':>6}"
        f"{'api µs':>8}   cpu % of one core"
    )
    print(head)
    print("-" * (len(head) + 50))
    for r in phases:
        print_phase(r)
    print(
        "latencies in ms; open loop: from each request's scheduled time; api µs: the API "
        "process's CPU per request (its cpu % x 10,000 / req/s)"
    )
    for r in phases:
        extra = []
        if "send_lag_ms_max" in r:
            extra.append(
                f"max send lag {r['send_lag_ms_max']:.0f} ms, connections {r['connections_opened']}"
            )
        if "first_tenth_ms" in r:
            extra.append(
                f"{r['requests']} pages / {r['items']} items; first tenth p50 "
                f"{_fmt(r['first_tenth_ms']['p50'])} ms, last tenth p50 "
                f"{_fmt(r['last_tenth_ms']['p50'])} ms"
            )
        extra += [f"error {e}" for e in r["errors"]]
        if any(not str(s).startswith("2") for s in r["statuses"]):
            extra.append(f"statuses {r['statuses']}")
        if r["cpu_percent"]["other"] > 25:
            extra.append(f"warning: {r['cpu_percent']['other']:.0f}% of a core went elsewhere")
        if extra:
            print(f"  {r['name']}: " + "; ".join(extra))
    print_calibration(meta)
    print(f"exit codes: {meta.get('exit_codes')}")
    if "cprofile" in meta:
        print_cprofile("api (every phase, bulk load idle)", meta["cprofile"], top=25)
    write_results("api", stamp, {**meta, "results": phases})
    bad = [
        r["name"]
        for r in phases
        if r["errors"] or any(not str(s).startswith("2") for s in r["statuses"])
    ]
    bad += [k for k, v in meta.get("exit_codes", {}).items() if v != 0]
    for b in bad:
        log(f"problem: {b}")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--loadgen"]:
        loadgen_main(argv[1])
        return 0
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
