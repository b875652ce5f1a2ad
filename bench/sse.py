"""SSE fan-out: N clients on one ``gengui api`` process, events published for their users.

    .venv/bin/python bench/sse.py                                  # 1,000 clients
    .venv/bin/python bench/sse.py --clients 10000 --client-procs 2 --rate 1000

Starts ``gengui api`` as a subprocess (``bench/e2e.py``'s helpers: a fresh database on
``GENGUI_DATABASE_URL`` or an embedded server, a fresh stream prefix), makes one user and
API token per ``--clients-per-user`` clients, and connects every client to
``GET /api/v1/events`` from ``--client-procs`` separate processes (so the clients'
parsing does not share a core with this one's publishing). Once every stream said it is
live, it publishes ``--events`` events per user, round robin over users, at ``--rate``
events/s in total, the way the consumers do (``core.notify``: replay log + pub/sub in one
script). Each event carries ``time.time()`` from just before its publish; latency is the
client's receive time minus that (same machine, same clock).

Prints deliveries received / expected (each client must get each of its user's events
once, in order), latency p50/p90/p99/max, the API process's CPU and memory, and how long
``gengui api`` took to exit on SIGTERM with every client still connected. Exit status 1
when a delivery is missing, repeated or out of order, or the API did not exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    BenchError,
    Procs,
    _proc_stat,
    drop_prefix,
    free_port,
    fresh_database,
    git_info,
    log,
    machine_info,
    percentiles,
    process_env,
    run_bounded,
    server_versions,
    start_servers,
    wait_ready,
)

# --------------------------------------------------------------------------- clients


def raise_fd_limit() -> int:
    """Each client is a socket: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Client:
    """One SSE stream: counts its events, checks their order, keeps their latencies."""

    def __init__(self, token: str, expected: int, complete: Callable[[], None]) -> None:
        self.token = token
        self.expected = expected
        self.complete = complete  # called once, when the last expected event came
        self.ready = asyncio.Event()
        self.events = 0
        self.duplicates = 0  # an id not above the last one: repeated or out of order
        self.last_id = (0, 0)
        self.latencies: list[float] = []
        self.error: str | None = None

    def frame(self, frame: bytes, received: float) -> None:
        event_id = data = None
        is_event = False
        for line in frame.split(b"\n"):
            if line.startswith(b"id: "):
                event_id = line[4:]
            elif line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                is_event = True
        if not is_event:
            if event_id is not None:
                self.ready.set()  # the id-only frame: the stream is live
            return
        ms, _, seq = (event_id or b"0-0").partition(b"-")
        key = (int(ms), int(seq))
        if key <= self.last_id:
            self.duplicates += 1
            return
        self.last_id = key
        self.events += 1
        if self.events == self.expected:
            self.complete()
        sent_at = orjson.loads(data or b"{}")["generation"]["sent_at"]
        self.latencies.append(received - sent_at)

    async def run(self, http: aiohttp.ClientSession, gate: asyncio.Semaphore) -> None:
        try:
            async with gate:
                resp = await http.get(
                    "/api/v1/events", headers={"Authorization": f"Bearer {self.token}"}
                )
            if resp.status != 200:
                self.error = f"HTTP {resp.status}"
                self.ready.set()
                return
            buffer = b""
            async with resp:
                while chunk := await resp.content.readany():
                    received = time.time()
                    buffer += chunk
                    *frames, buffer = buffer.split(b"\n\n")
                    for frame in frames:
                        self.frame(frame, received)
        except (aiohttp.ClientError, OSError) as exc:
            self.error = repr(exc)
            self.ready.set()


async def _client_proc(
    base_url: str, tokens: list[str], expected: int, pipe: Connection, connect_concurrency: int
) -> None:
    loop = asyncio.get_running_loop()
    remaining = len(tokens)
    all_done = asyncio.Event()

    def complete() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            all_done.set()

    clients = [Client(t, expected, complete) for t in tokens]
    gate = asyncio.Semaphore(connect_concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=None)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:
        started = time.perf_counter()
        tasks = [asyncio.create_task(c.run(http, gate)) for c in clients]
        await asyncio.gather(*(c.ready.wait() for c in clients))
        errors = [c.error for c in clients if c.error]
        pipe.send(("ready", len(clients) - len(errors), errors[:5], time.perf_counter() - started))
        finish = loop.run_in_executor(None, pipe.recv)  # "finish": report what there is
        done = asyncio.ensure_future(all_done.wait())
        await asyncio.wait({finish, done}, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        pipe.send(
            (
                "done",
                [lat for c in clients for lat in c.latencies],
                sum(c.events for c in clients),
                sum(c.duplicates for c in clients),
                sum(1 for c in clients if c.events < expected),
            )
        )
        if not finish.done():
            await finish
        # "close": the parent has stopped the API; our streams have ended (or end now).
        await asyncio.wait(tasks, timeout=30)
        ended = sum(1 for t in tasks if t.done())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipe.send(("closed", ended))


def client_proc(*args: Any) -> None:
    raise_fd_limit()
    # The clients' own garbage collector must not pause what they measure: with 10,000
    # streams in a process a full collection takes hundreds of ms, which would count
    # as delivery latency. Their garbage is bounded by the run.
    gc.disable()
    asyncio.run(_client_proc(*args))


# --------------------------------------------------------------------------- setup


async def make_users(database_url: str, n: int) -> list[tuple[Any, str]]:
    """``n`` users with one API token each, in two statements."""
    import uuid

    from core.auth import hash_token, new_token
    from core.db import asyncpg_dsn

    ids = [uuid.uuid4() for _ in range(n)]
    tokens = [new_token() for _ in range(n)]
    conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    try:
        await conn.execute(
            """INSERT INTO users (id, email, plan, email_verified_at)
               SELECT u, 'sse-' || u || '@bench.example', 'free', now()
                 FROM unnest($1::uuid[]) u""",
            ids,
        )
        await conn.execute(
            """INSERT INTO api_tokens (id, user_id, token_hash, name)
               SELECT gen_random_uuid(), u, h, 'bench'
                 FROM unnest($1::uuid[], $2::bytea[]) AS t(u, h)""",
            ids,
            [hash_token(t) for t in tokens],
        )
    finally:
        await conn.close()
    return list(zip(ids, tokens, strict=True))


async def publish(
    redis_url: str, prefix: str, user_ids: Sequence[Any], per_user: int, rate: float
) -> tuple[int, float]:
    """Open loop at ``rate``/s; returns (published, seconds). Several in flight at once,
    as several consumer processes would publish."""
    from core.events import UserEvent
    from core.keys import Keys
    from core.notify import publish_user_event
    from core.streams import shared_client

    redis = shared_client(redis_url, max_connections=16)
    keys = Keys(prefix)
    plan = [(u, k) for k in range(per_user) for u in user_ids]
    gate = asyncio.Semaphore(16)

    async def one(user_id: Any, k: int) -> None:
        async with gate:
            event = UserEvent(
                type="generation.progress",
                generation={"id": f"{user_id}-{k}", "sent_at": time.time()},
            )
            await publish_user_event(redis, keys, user_id, event)

    started = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, (user_id, k) in enumerate(plan):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(user_id, k)))
        await asyncio.gather(*tasks)
    finally:
        await redis.aclose()
    return len(plan), time.perf_counter() - started


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    hard = raise_fd_limit()
    if args.clients + 100 > hard:
        raise BenchError(f"{args.clients} clients need more open files than the limit {hard}")
    tmp = Path(tempfile.mkdtemp(prefix="gengui-sse-"))
    token = secrets.token_hex(4)
    db_name, prefix = f"gengui_bench_{token}", f"bench{token}"
    problems: list[str] = []
    children: list[tuple[mp.process.BaseProcess, Connection]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        servers = await asyncio.to_thread(start_servers, tmp)
        versions = await server_versions(servers)
        stack.push_async_callback(drop_prefix, servers.redis_url, prefix)
        database_url = await fresh_database(stack, servers, db_name)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = process_env(database_url, servers.redis_url, prefix, tmp / "data", port)
        env.update(item.split("=", 1) for item in args.set)
        (tmp / "logs").mkdir()
        procs = Procs(env, tmp / "logs")
        stack.callback(procs.stop)
        api = procs.start("api", "api")
        await wait_ready(base_url, procs)

        users = await make_users(database_url, -(-args.clients // args.clients_per_user))
        tokens = [users[i // args.clients_per_user][1] for i in range(args.clients)]
        ctx = mp.get_context("spawn")
        share = -(-args.clients // args.client_procs)
        for i in range(args.client_procs):
            mine = tokens[i * share : (i + 1) * share]
            if not mine:
                continue
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=client_proc,
                args=(base_url, mine, args.events, child, args.connect_concurrency),
                daemon=True,
            )
            proc.start()
            children.append((proc, parent))

        def kill_children() -> None:
            for proc, _ in children:
                if proc.is_alive():
                    proc.kill()

        stack.callback(kill_children)

        def recv(pipe: Connection, limit_s: float) -> Any:
            if not pipe.poll(limit_s):
                raise BenchError(f"a client process said nothing in {limit_s:.0f} s")
            return pipe.recv()

        log(f"connecting {args.clients} clients ({len(users)} users)")
        readies = [await asyncio.to_thread(recv, pipe, 300) for _, pipe in children]
        connected = sum(r[1] for r in readies)
        connect_s = max(r[3] for r in readies)
        for r in readies:
            problems += [f"connect: {e}" for e in r[2]]
        log(f"{connected} streams live after {connect_s:.1f} s; publishing")
        procs.check_alive()
        cpu_before, wall_before = _proc_stat(api.pid), time.perf_counter()
        published, publish_s = await publish(
            servers.redis_url, prefix, [u for u, _ in users], args.events, args.rate
        )
        results = []
        deadline = time.monotonic() + args.drain_timeout
        for _, pipe in children:
            left = max(0.0, deadline - time.monotonic())
            if not pipe.poll(left):
                pipe.send("finish")
            results.append(await asyncio.to_thread(recv, pipe, 60))
        cpu_after, wall_after = _proc_stat(api.pid), time.perf_counter()
        rss = rss_mib(api.pid)

        latencies = [lat for r in results for lat in r[1]]
        delivered = sum(r[2] for r in results)
        duplicates = sum(r[3] for r in results)
        short = sum(r[4] for r in results)
        expected = args.clients * args.events

        # SIGTERM with every stream open: the API must end them and exit promptly.
        stop_started = time.perf_counter()
        api.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(api.wait, 30)
        except Exception:
            code = None
        stop_s = time.perf_counter() - stop_started
        for _, pipe in children:
            pipe.send("close")
        ended = sum(recv(pipe, 60)[1] for _, pipe in children)

    cpu_pct = (
        round(100 * (cpu_after[2] - cpu_before[2]) / (wall_after - wall_before), 1)
        if cpu_before and cpu_after
        else None
    )
    p = percentiles(latencies)
    commit = (git_info().get("commit") or "")[:8]
    machine = machine_info()
    print(
        f"sse fan-out, one gengui api process ({machine['nproc']} cores, {machine['cpu']}; "
        f"PostgreSQL {versions['postgres']} / {versions['redis']}; commit {commit})"
    )
    print(
        f"clients {args.clients} ({args.clients_per_user}/user, {args.client_procs} client "
        f"procs), events {args.events}/user at {args.rate:g}/s: published {published} in "
        f"{publish_s:.1f} s ({published / publish_s:.0f}/s)"
    )
    print(f"connect: {connected}/{args.clients} streams live in {connect_s:.1f} s")
    print(
        f"delivered {delivered}/{expected}, duplicates or out of order {duplicates}, "
        f"clients short {short}"
    )
    print(
        f"latency ms (publish -> client received): p50 {p['p50']} p90 {p['p90']} "
        f"p99 {p['p99']} max {p['max']}"
    )
    print(f"api process: cpu {cpu_pct}% of one core while publishing+draining, rss {rss} MiB")
    print(
        f"shutdown: SIGTERM with {args.clients} streams open -> exit {code} in "
        f"{stop_s:.2f} s; streams ended at the clients {ended}/{args.clients}"
    )
    if delivered != expected:
        problems.append(f"delivered {delivered} of {expected}")
    if duplicates:
        problems.append(f"{duplicates} duplicate or out-of-order deliveries")
    if code != 0:
        problems.append(f"gengui api exited with {code}")
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="SSE clients (default 1000)")
    p.add_argument("--clients-per-user", type=int, default=1, help="streams per user")
    p.add_argument("--events", type=int, default=5, help="events published per user")
    p.add_argument("--rate", type=float, default=500, help="events published per second")
    p.add_argument("--client-procs", type=int, default=1, help="processes holding the clients")
    p.add_argument("--connect-concurrency", type=int, default=100, help="connects in flight")
    p.add_argument(
        "--drain-timeout", type=float, default=30, help="seconds to wait for the last events"
    )
    p.add_argument("--set", action="append", default=[], help="GENGUI_X=V for gengui api")
    p.add_argument("--max-runtime", type=float, default=900, help="give up after this long")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
