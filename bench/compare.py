"""gengui vs the Celery + Redis baseline, back to back, same load, one command.

    .venv/bin/python bench/compare.py                          # closed loop, 2000 each
    .venv/bin/python bench/compare.py --rates 100,200 --duration 10
    .venv/bin/python bench/compare.py --rounds 2               # g, c, then c, g

Runs ``bench/e2e.py`` (gengui: api, consumers ``dispatch,status`` and one placeholder
worker; thumbnails off) and ``bench/celery_baseline/run.py`` (web + one Celery worker)
one after the other with the same load-generator arguments, each against its own
fresh database on the same Postgres and Redis, then prints both tables' key figures
side by side and the ratios (gengui / Celery for throughput, Celery / gengui for
latency and CPU, so above 1 means gengui is better). With ``--rounds 2`` the second
round runs them in the other order, so a drift in the machine's speed favours
neither. Each run's own output goes to stderr; the summary to stdout and
``bench/results/compare-<ts>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import RESULTS_DIR, ROOT, log, machine_info

BENCH = Path(__file__).resolve().parent
# The processes whose CPU counts as "the pipeline" in each stack (from the CPU tables).
PIPELINE = {"gengui": ("api", "consumers", "worker"), "celery": ("web", "celery")}
SERVERS = ("postgres", "redis")


def load_args(args: argparse.Namespace) -> list[str]:
    """The load-generator arguments both runs get."""
    out = ["--size", str(args.size), "--warmup", str(args.warmup), "--engine", args.engine]
    if args.rates:
        out += ["--rates", args.rates, "--duration", str(args.duration)]
    else:
        out += ["--n", str(args.n), "--concurrency", str(args.concurrency)]
    return out


def run_one(stack: str, args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """One run as a subprocess; its output is echoed to stderr; returns (exit, JSON)."""
    if stack == "gengui":
        command = [sys.executable, str(BENCH / "e2e.py"), *load_args(args), "--no-thumbnails"]
        command += [f"--set={item}" for item in args.set] + args.gengui_arg
    else:
        command = [sys.executable, str(BENCH / "celery_baseline" / "run.py"), *load_args(args)]
        command += ["--celery-python", args.celery_python, *args.celery_arg]
    log(f"{stack}: {' '.join(command)}")
    done = subprocess.run(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, check=False
    )
    sys.stderr.write(done.stdout)
    path = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in done.stdout.splitlines()
            if ln.startswith("results:")
        ),
        None,
    )
    if path is None:
        return done.returncode, None
    return done.returncode, orjson.loads((ROOT / path).read_bytes())


def cpu_ms_per_generation(phase: dict[str, Any], names: Sequence[str]) -> float:
    """CPU ms of the named processes per completed generation: ``cpu_percent`` is % of
    one core over the phase (first POST to the end of the wait, ~``wall_s``)."""
    if not phase["completed"]:
        return 0.0
    pct = sum(
        v
        for k, v in phase["cpu_percent"].items()
        # ``worker1``, ``worker2``... with ``--gengui-arg=--workers=N``.
        if any(k == n or (k.startswith(n) and k[len(n) :].isdigit()) for n in names)
    )
    return round(10 * pct * phase["wall_s"] / phase["completed"], 2)


def summarize(stack: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per phase: throughput, latency, and CPU milliseconds per completed generation."""
    out = []
    for r in report["results"]:
        cpu = r["cpu_percent"]
        out.append(
            {
                "stack": stack,
                "phase": r["name"],
                "n": r["n"],
                "completed": r["completed"],
                "failures": r["submit_errors"] + r["failed"] + r["not_completed"],
                "done_per_s": r["completed_per_s"],
                "submit_per_s": r["submit_per_s"],
                "p50_ms": r["latency_ms"]["p50"],
                "p99_ms": r["latency_ms"]["p99"],
                "post_p50_ms": r["post_latency_ms"]["p50"],
                "cpu_ms_per_generation": {
                    "pipeline": cpu_ms_per_generation(r, PIPELINE[stack]),
                    "servers": cpu_ms_per_generation(r, SERVERS),
                },
                "machine_busy": cpu["machine"],
                "other": cpu["other"],
            }
        )
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="closed loop: generations per run")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: POSTs in flight")
    p.add_argument("--rates", help="open loop: comma-separated POST rates instead")
    p.add_argument("--duration", type=float, default=10.0, help="open loop: seconds per rate")
    p.add_argument("--size", type=int, default=256, help="image side (the smallest allowed)")
    p.add_argument(
        "--engine",
        choices=["placeholder", "instant"],
        default="placeholder",
        help="both stacks render with gengui's placeholder, or return its instant tiny PNG",
    )
    p.add_argument("--warmup", type=int, default=20, help="generations before measuring")
    p.add_argument("--rounds", type=int, default=1, help="rounds; even rounds swap the order")
    p.add_argument("--celery-python", default="/tmp/celery-venv/bin/python")
    p.add_argument(
        "--celery-arg",
        action="append",
        default=[],
        help="extra argument for celery_baseline/run.py",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="GENGUI_X=V", help="gengui setting"
    )
    p.add_argument(
        "--gengui-arg",
        action="append",
        default=[],
        help="extra argument for bench/e2e.py, e.g. --gengui-arg=--workers=2",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    codes: list[int] = []
    for i in range(args.rounds):
        order = ("gengui", "celery") if i % 2 == 0 else ("celery", "gengui")
        for stack in order:
            code, report = run_one(stack, args)
            codes.append(code)
            if report is None:
                log(f"{stack}: no results (exit {code})")
                return 1
            for row in summarize(stack, report):
                row["round"] = i + 1
                rows.append(row)
    print(
        f"\ngengui vs Celery + Redis, {started.isoformat(timespec='seconds')} "
        f"({machine_info()['nproc']} cores); load: {' '.join(load_args(args))}, thumbnails off"
    )
    head = (
        f"{'round':>5} {'stack':<7}{'phase':<10}{'done/s':>8}{'submit/s':>9}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'POST p50':>9}{'cpu ms/gen':>11}{'+servers':>9}{'busy %':>7}"
        f"{'other':>6}{'fail':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['round']:>5} {r['stack']:<7}{r['phase']:<10}{r['done_per_s']:>8.1f}"
            f"{r['submit_per_s']:>9.0f}{r['p50_ms'] or 0:>8.0f}{r['p99_ms'] or 0:>8.0f}"
            f"{r['post_p50_ms'] or 0:>9.0f}{r['cpu_ms_per_generation']['pipeline']:>11.2f}"
            f"{r['cpu_ms_per_generation']['servers']:>9.2f}{r['machine_busy']:>7.0f}"
            f"{r['other']:>6.0f}{r['failures']:>5}"
        )
    print(
        "cpu ms/gen: CPU of the pipeline's processes (gengui: api + consumers + worker; "
        "Celery: web + worker with its pool) per completed generation; +servers: Postgres "
        "and Redis on top"
    )
    ratios: dict[str, dict[str, float | None]] = {}
    for phase in dict.fromkeys(r["phase"] for r in rows):
        g = [r for r in rows if r["phase"] == phase and r["stack"] == "gengui"]
        c = [r for r in rows if r["phase"] == phase and r["stack"] == "celery"]

        def med(items: list[dict[str, Any]], key: str) -> float | None:
            values = [v for v in (it[key] for it in items) if v is not None]
            return statistics.median(values) if values else None

        def med_cpu(items: list[dict[str, Any]]) -> float | None:
            values = [it["cpu_ms_per_generation"]["pipeline"] for it in items]
            return statistics.median(values) if values else None

        ratios[phase] = {
            "throughput_gengui_over_celery": ratio(med(g, "done_per_s"), med(c, "done_per_s")),
            "p50_celery_over_gengui": ratio(med(c, "p50_ms"), med(g, "p50_ms")),
            "p99_celery_over_gengui": ratio(med(c, "p99_ms"), med(g, "p99_ms")),
            "cpu_per_generation_celery_over_gengui": ratio(med_cpu(c), med_cpu(g)),
        }
        rr = ratios[phase]
        print(
            f"ratio {phase}: throughput gengui/Celery {rr['throughput_gengui_over_celery']}x; "
            f"latency p50 Celery/gengui {rr['p50_celery_over_gengui']}x, p99 "
            f"{rr['p99_celery_over_gengui']}x; pipeline CPU per generation Celery/gengui "
            f"{rr['cpu_per_generation_celery_over_gengui']}x"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"compare-{started.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_bytes(
        orjson.dumps(
            {
                "started_at": started.isoformat(timespec="seconds"),
                "args": vars(args),
                "rows": rows,
                "ratios": ratios,
                "exit_codes": codes,
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"results: {out.relative_to(ROOT)}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
