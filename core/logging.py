"""structlog set up once per process: JSON lines in production, pretty in a terminal.

Every line is an event name plus fields (``generation.dispatched generation_id=…``);
request and generation ids are bound with contextvars so nested calls inherit them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
import structlog.tracebacks

# Tracebacks as data, without each frame's local variables: a frame of the login path
# holds the password, of a provider call the API key (structlog shows locals unless told).
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
_SECRET_FIELDS = frozenset({"password", "token", "authorization", "secret", "api_key"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # Secrets never reach a log line, whoever passes them.
    for name in event.keys() & _SECRET_FIELDS:
        event[name] = "[redacted]"
    return event


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Our events go straight to stderr as JSON lines (orjson, no stdlib logging on the
    way); other libraries' stdlib records get the same shape through a handler.
    ``console`` renders both through stdlib logging, for a terminal.

    Why not stdlib logging for ours too: a line through structlog's stdlib bridge (a
    ``LogRecord``, the handler's lock, a second processor run in the formatter) cost
    34-46 us of CPU, the native path 9 us (``bench/README.md``), and a generation logs a
    line in each process it crosses."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        _redact,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    # Records of other libraries, from stdlib logging.
    foreign: list[Any] = [
        *shared[:2],
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        *shared[2:],
    ]
    wrapper = structlog.make_filtering_bound_logger(level.upper())
    final: list[Any]
    if fmt == "console":
        structlog.configure(
            processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=wrapper,
            cache_logger_on_first_use=True,
        )
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(),
        ]
    else:
        structlog.configure(
            processors=[
                *shared,
                _TRACEBACKS,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
            wrapper_class=wrapper,
            cache_logger_on_first_use=True,
        )
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _TRACEBACKS,
            structlog.processors.JSONRenderer(),
        ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=foreign, processors=final)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    # The name as a field: the JSON path has no stdlib logger to take it from.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name).bind(logger=name)
    return logger
