"""What one request costs this machine before gengui does anything: an aiohttp
"hello world" on uvloop, driven at fixed rates, its CPU per request.

    .venv/bin/python bench/http_floor.py                    # 100, 300, 1000, 3000 req/s
    .venv/bin/python bench/http_floor.py --rates 100,1000 --seconds 10

The server runs in its own process; this one sends GETs over keep-alive connections
at each rate (open loop) and reads the server's CPU time from ``/proc``. On the 2-core
VM of ``bench/README.md`` a request cost several times more at 100/s than at 3,000/s:
most of a lightly loaded process's CPU goes to waking up, not to the work. Read
``api.py``'s "api µs" per POST against this floor at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

SERVER = """
import sys, uvloop
from aiohttp import web

async def hello(request):
    return web.Response(text="hello")

app = web.Application()
app.router.add_get("/", hello)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError("the server did not start")


async def drive(pid: int, port: int, rates: Sequence[int], seconds: float) -> None:
    import aiohttp

    url = f"http://127.0.0.1:{port}/"
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.get(url) as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(50)))  # warm the connections
        print(f"{'rate':>6} {'req/s':>8} {'server µs/req':>14}")
        for rate in rates:
            n = int(rate * seconds)
            t0, c0 = time.perf_counter(), cpu_s(pid)
            tasks = []
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            wall, cpu = time.perf_counter() - t0, cpu_s(pid) - c0
            print(f"{rate:>6} {n / wall:>8.0f} {cpu / n * 1e6:>14.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100,300,1000,3000", help="comma-separated req/s")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per rate")
    args = p.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        asyncio.run(wait_ready(port))
        rates = [int(r) for r in args.rates.split(",")]
        asyncio.run(drive(server.pid, port, rates, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
