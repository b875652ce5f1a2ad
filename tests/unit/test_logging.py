"""The JSON log lines of a service process, read from a real process's stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import logging
from core.logging import configure_logging, get_logger
configure_logging("json", "INFO")
log = get_logger("core.example")

def login(password):
    raise ValueError("wrong password")

log.info("example.started", token="abc123", count=1)
log.debug("example.hidden")
try:
    login("hunter2-local-secret")
except ValueError:
    log.exception("example.failed")
try:
    login("hunter2-local-secret")
except ValueError:
    logging.getLogger("somelib").exception("somelib.failed")
"""


def _lines() -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "hunter2-local-secret" not in done.stderr  # no frame's locals, ours or a library's
    assert "abc123" not in done.stderr
    return [json.loads(line) for line in done.stderr.splitlines()]


def test_json_lines_carry_event_level_logger_and_redact_secrets() -> None:
    started, failed, foreign = _lines()
    assert started["event"] == "example.started" and started["level"] == "info"
    assert started["logger"] == "core.example" and started["count"] == 1
    assert started["token"] == "[redacted]"
    assert str(started["timestamp"]).endswith("Z")
    # A traceback is data: frames with file, line and function, never local variables.
    assert failed["level"] == "error"
    [exc] = failed["exception"]  # type: ignore[misc]
    assert exc["exc_type"] == "ValueError" and exc["frames"][-1]["name"] == "login"
    assert all("locals" not in frame for frame in exc["frames"])
    assert foreign["logger"] == "somelib" and foreign["event"] == "somelib.failed"
