"""The real processes, started as subprocesses and driven over HTTP like the README does."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis import Redis as SyncRedis

from tests.conftest import Servers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

GENGUI = [sys.executable, "-m", "core.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENGUI_")}
    env.update(
        GENGUI_DATA_DIR=str(tmp_path / "data"),
        GENGUI_API_PORT=str(port),
        GENGUI_STREAM_PREFIX=f"e2e{uuid.uuid4().hex[:8]}",
        GENGUI_LOG_LEVEL="WARNING",
        GENGUI_RECONCILE_INTERVAL_S="0.5",
        # The walk-throughs poll several times a second as one user.
        GENGUI_REQUESTS_PER_MINUTE="0",
    )
    return env


class Procs:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}  # type: ignore[type-arg]
        self.files: list = []  # type: ignore[type-arg]

    def start(self, name: str, *args: str) -> subprocess.Popen:  # type: ignore[type-arg]
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115  (closed in terminate_all)
        self.files.append(out)
        proc = subprocess.Popen(
            [*GENGUI, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        self.procs[name] = proc
        return proc

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [*GENGUI, *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def terminate_all(self, timeout_s: float = 20) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        for f in self.files:
            f.close()
        self.files.clear()
        return codes

    def drop_streams(self) -> None:
        """The keys of this run's prefix, as the rt fixture drops those of in-process
        tests: a shared Redis keeps nothing of a finished test."""
        url = self.env.get("GENGUI_REDIS_URL")
        if not url:
            return
        client = SyncRedis.from_url(url)
        try:
            leftovers = list(client.scan_iter(match=f"{self.env['GENGUI_STREAM_PREFIX']}:*"))
            if leftovers:
                client.delete(*leftovers)
        finally:
            client.close()

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-12000:]}" for p in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Procs(base_env(tmp_path, port), logs)
    p.env["_PORT"] = str(port)
    yield p
    p.terminate_all(5)
    p.drop_streams()


async def wait_ready(base: str, timeout_s: float = 60) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            try:
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def walk_through(base: str, token: str) -> None:
    """The README's curl walk-through, over HTTP."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base, headers=headers) as http:
        async with http.post(
            "/api/v1/generations",
            json={"prompt": "a lighthouse at dusk", "width": 512, "height": 512},
        ) as resp:
            assert resp.status == 202
            gid = (await resp.json())["id"]
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"/api/v1/generations/{gid}") as resp:
                    body = await resp.json()
                if body["status"] == "completed" and body["thumbnail_url"]:
                    break
                assert body["status"] not in {"failed", "cancelled"}, body
                await asyncio.sleep(0.1)
        async with http.get(body["image_url"]) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            assert len(await resp.read()) > 1000
        async with http.get(body["thumbnail_url"]) as resp:
            assert resp.status == 200 and resp.content_type == "image/webp"


async def test_separate_processes_complete_a_generation_and_stop_cleanly(
    procs: Procs, servers: Servers
) -> None:
    procs.env.update(GENGUI_DATABASE_URL=servers.database_url, GENGUI_REDIS_URL=servers.redis_url)
    port = procs.env["_PORT"]
    procs.run("migrate")
    for name, args in {
        "api": ["api"],
        "consumers": ["consumers"],
        "worker": ["worker"],
        "reconciler": ["reconciler"],
    }.items():
        procs.start(name, *args)
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        token = (
            procs.run("users", "create", f"{uuid.uuid4().hex[:8]}@example.com")
            .strip()
            .splitlines()[-1]
        )
        await walk_through(f"http://127.0.0.1:{port}", token)
    except BaseException:
        print(procs.tail())
        raise
    codes = procs.terminate_all()
    assert codes == {"api": 0, "consumers": 0, "worker": 0, "reconciler": 0}, procs.tail()


async def test_gengui_dev_runs_on_embedded_servers_with_zero_config(procs: Procs) -> None:
    port = procs.env["_PORT"]
    dev = procs.start("dev", "dev")
    try:
        await wait_ready(f"http://127.0.0.1:{port}", timeout_s=90)
        # A sibling command finds the embedded servers `gengui dev` started.
        token = procs.run("users", "create", "newcomer@example.com").strip().splitlines()[-1]
        assert token.startswith("gg_")
        await walk_through(f"http://127.0.0.1:{port}", token)
    except BaseException:
        print(procs.tail())
        raise
    codes = procs.terminate_all(30)
    assert codes == {"dev": 0}, procs.tail()
    assert dev.returncode == 0
    assert not (Path(procs.env["GENGUI_DATA_DIR"]) / "services.json").exists()
