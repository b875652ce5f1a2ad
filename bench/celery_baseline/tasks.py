"""The baseline's Celery app: dispatch -> generate -> status, as a usual Celery + Redis
project would write them. Runs in its own virtualenv (see README.md), never in gengui's.

Each task does the same database work as gengui's step of the same name: a
compare-and-set UPDATE fenced by attempt with its ``generation_events`` row in one
statement (gengui's ``core.lifecycle`` SQL), and a pub/sub notice carrying the
generation's resource on ``<prefix>:user:<user_id>``, where ``bench/e2e.py``'s
listener times it. ``generate`` renders with gengui's own placeholder (the module is
loaded from its file: it needs only Pillow) and stores the PNG like gengui's
``LocalStorage`` (temp file, fsync, rename, fsync of the directory).

Configuration comes from the environment the runner sets: ``BENCH_DATABASE_URL``,
``BENCH_BROKER_URL``, ``BENCH_REDIS_URL`` (notices), ``BENCH_PREFIX``, ``BENCH_QUEUE``,
``BENCH_IMAGES_DIR``, ``BENCH_PROCESSING_REPORT`` (``1``: generate reports
``processing`` through the status task first, as gengui's worker does).

Celery settings are its defaults (prefork pool, one child per core, prefetch
multiplier 4, early acks), except that results are ignored: no result backend, the
cheapest and most common set-up for fire-and-forget pipelines.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
from celery import Celery
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("BENCH_PREFIX", "bench")
QUEUE = os.environ.get("BENCH_QUEUE", "celery")
IMAGES = Path(os.environ.get("BENCH_IMAGES_DIR", "/tmp/gengui-celery-images"))
PROCESSING_REPORT = os.environ.get("BENCH_PROCESSING_REPORT", "1") == "1"

app = Celery("gengui_baseline", broker=os.environ.get("BENCH_BROKER_URL", "redis://"))
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def _placeholder() -> Any:
    """gengui's placeholder module, loaded from its file (no gengui imports)."""
    path = ROOT / "providers" / "local" / "engines" / "placeholder.py"
    spec = importlib.util.spec_from_file_location("gengui_placeholder", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_PLACEHOLDER = _placeholder()
# BENCH_ENGINE=instant: gengui's instant engine (one tiny PNG), as `gengui worker --engine`.
if os.environ.get("BENCH_ENGINE", "placeholder") == "instant":

    def render_placeholder(*_: Any) -> bytes:
        return bytes(_PLACEHOLDER.tiny_png())

else:
    render_placeholder = _PLACEHOLDER.render_placeholder

# One connection per worker process, opened on first use (after the prefork fork).
_db: psycopg.Connection[dict[str, Any]] | None = None
_redis: redis.Redis | None = None


def db() -> psycopg.Connection[dict[str, Any]]:
    global _db
    if _db is None or _db.closed:
        _db = psycopg.connect(
            os.environ["BENCH_DATABASE_URL"], autocommit=True, row_factory=dict_row
        )
    return _db


def notices() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _redis


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def resource(row: dict[str, Any]) -> dict[str, Any]:
    """The same public shape gengui sends in its notices (``core.generations.resource``)."""
    gid = row["id"]
    error = (
        {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None
    )
    return {
        "id": str(gid),
        "status": row["status"],
        "attempt": row["attempt"],
        "provider": row["provider"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "width": row["width"],
        "height": row["height"],
        "seed": row["seed"],
        "progress": row["progress"],
        "error": error,
        "image_url": f"/api/v1/generations/{gid}/image" if row["image_key"] else None,
        "thumbnail_url": None,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "completed_at": _iso(row["completed_at"]),
    }


def notify(row: dict[str, Any], event_type: str) -> None:
    event = {"v": 1, "type": event_type, "generation": resource(row)}
    notices().publish(f"{PREFIX}:user:{row['user_id']}", orjson.dumps(event))


# core.lifecycle's CAS: the row, its history and its check in one statement.
_TRANSITION = """
    WITH upd AS (
        UPDATE generations SET status = %(to)s, updated_at = now(){sets}
         WHERE id = %(id)s AND attempt = %(attempt)s AND status = ANY(%(allowed)s)
     RETURNING *
    ), hist AS (
        INSERT INTO generation_events (generation_id, attempt, status, detail)
        SELECT id, attempt, status, NULL FROM upd
    ), chk AS ({check})
    SELECT * FROM upd
"""
_CHECK_IN_2_MIN = """
    INSERT INTO generation_checks (generation_id, due_at)
    SELECT id, now() + interval '120 seconds' FROM upd
        ON CONFLICT (generation_id) DO UPDATE SET due_at = EXCLUDED.due_at"""
_SUBMITTED = _TRANSITION.format(sets="", check=_CHECK_IN_2_MIN)
_PROCESSING = _TRANSITION.format(sets="", check=_CHECK_IN_2_MIN)
_COMPLETED = _TRANSITION.format(
    sets=", image_key = %(image_key)s, image_content_type = 'image/png', completed_at = now(), "
    "progress = 1.0",
    check="DELETE FROM generation_checks c USING upd WHERE c.generation_id = upd.id",
)


@app.task
def dispatch(generation_id: str, attempt: int) -> None:
    """queued -> submitted, then hand the job to a generate task."""
    row = (
        db()
        .execute(
            _SUBMITTED,
            {"to": "submitted", "id": generation_id, "attempt": attempt, "allowed": ["queued"]},
        )
        .fetchone()
    )
    if row is None:
        return  # a duplicate: already dispatched
    generate.delay(
        generation_id,
        attempt,
        str(row["user_id"]),
        row["prompt"],
        row["negative_prompt"],
        row["width"],
        row["height"],
        row["seed"],
    )
    notify(row, "generation.submitted")


def _store(key: str, data: bytes) -> None:
    """gengui's LocalStorage write: temp file, fsync, rename, fsync the directory."""
    path = IMAGES / key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@app.task
def generate(
    generation_id: str,
    attempt: int,
    user_id: str,
    prompt: str,
    negative_prompt: str | None,
    width: int,
    height: int,
    seed: int,
) -> None:
    """Render, store, report: gengui's worker, as a task."""
    if PROCESSING_REPORT:
        status.delay(generation_id, attempt, "processing")
    data = render_placeholder(prompt, negative_prompt, width, height, seed)
    key = f"users/{user_id}/generations/{generation_id}/{attempt}-original.png"
    _store(key, data)
    status.delay(generation_id, attempt, "completed", key)


@app.task
def status(generation_id: str, attempt: int, state: str, image_key: str | None = None) -> None:
    """Apply a worker's report: gengui's status consumer, as a task."""
    params: dict[str, Any] = {"id": generation_id, "attempt": attempt, "image_key": image_key}
    if state == "processing":
        sql, params["to"], params["allowed"] = _PROCESSING, "processing", ["submitted"]
    else:
        sql, params["to"] = _COMPLETED, "completed"
        params["allowed"] = ["submitted", "processing"]
    row = db().execute(sql, params).fetchone()
    if row is not None:
        notify(row, f"generation.{state}")
