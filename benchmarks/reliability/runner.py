"""`make reliability`: reliability, security and monitoring under load, faults and bad input (GitHub issue 8).

    .venv/bin/python -m benchmarks.reliability [--quick] [--only swap,crash] [--soak-s S] [--work DIR]

Builds real archives, starts a real TorchServe on free loopback ports (rig.py) and runs each scenario against
it: exact Prometheus counts, `tspack serve status`, the bad-input matrix, security, a zero-downtime version
swap, a killed worker, overload, a soak, the known product issues the matrix found, and a restart after a
frontend crash. Writes benchmarks/results/reliability.json and RELIABILITY.md; exits 1 when a check failed.
tests/integration/test_reliability.py runs the same scenario functions with `Settings.ci()`.

Every load is bounded in clients, requests per client and seconds, and stops by itself. Timing bounds
(throughput back within 10 s, fast 503s) are asserted only when `Settings.strict_timing` (the make target);
the CI settings check recovery itself, with generous deadlines, because the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Optional

from benchmarks.reliability import inputs, report
from benchmarks.reliability.bad_input import scenario_bad_input
from benchmarks.reliability.crash import scenario_crash
from benchmarks.reliability.known_issues import scenario_known_issues
from benchmarks.reliability.metrics import scenario_metrics
from benchmarks.reliability.overload import scenario_overload
from benchmarks.reliability.restart import scenario_restart
from benchmarks.reliability.result import Result, failed_checks
from benchmarks.reliability.rig import REPO, Rig, prepare
from benchmarks.reliability.security import scenario_security
from benchmarks.reliability.settings import Settings
from benchmarks.reliability.soak import scenario_soak
from benchmarks.reliability.status import scenario_status
from benchmarks.reliability.swap import scenario_swap

BENCH_DIR = os.path.join(REPO, "benchmarks")

SCENARIOS: dict[str, Callable[..., dict]] = {
    "metrics": scenario_metrics, "status": scenario_status, "bad_input": scenario_bad_input,
    "security": scenario_security, "swap": scenario_swap, "crash": scenario_crash, "overload": scenario_overload,
    "soak": scenario_soak, "known_issues": scenario_known_issues, "restart": scenario_restart,
}


def run_scenario(name: str, rig: Rig, settings: Settings, bar: Any = None) -> dict:
    """Run one scenario; an exception becomes a failed row naming it, so the other scenarios still run."""
    try:
        if name == "soak" and bar is not None:
            return scenario_soak(rig, settings, progress=lambda s: bar.set_postfix_str(f"soak {s:.0f}/"
                                                                                        f"{settings.soak_s:g} s"))
        return SCENARIOS[name](rig, settings)
    except Exception as exc:  # a broken scenario is a failed row, not a lost report
        result = Result(name, name)
        result.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        result.figures["traceback"] = traceback.format_exc().splitlines()[-8:]
        return result.done()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened soak (60 s) and overload")
    parser.add_argument("--only", help=f"comma-separated scenarios, of: {','.join(SCENARIOS)}")
    parser.add_argument("--soak-s", type=float, help="soak duration in seconds")
    parser.add_argument("--work", default=os.path.join(BENCH_DIR, "work", "reliability"))
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "reliability.json"))
    parser.add_argument("--markdown", default=os.path.join(REPO, "RELIABILITY.md"))
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.soak_s:
        settings = replace(settings, soak_s=args.soak_s, soak_warmup_s=min(settings.soak_warmup_s, args.soak_s / 4))
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    started, stamp = time.monotonic(), _dt.datetime.now(_dt.timezone.utc)
    bar = tqdm(total=len(names) + 1, desc="reliability", unit="step")
    bar.set_postfix_str("build archives, start TorchServe")
    rig = prepare(args.work)
    setup_s = time.monotonic() - started
    bar.update(1)
    results = []
    try:
        for name in names:
            bar.set_postfix_str(name)
            results.append(run_scenario(name, rig, settings, bar))
            row = results[-1]
            bar.write(f"{'PASS' if row['passed'] else 'FAIL'}  {row['title']}: {row['requests']} requests, "
                      f"{row['failures']} failures" + "".join(f"\n      - {c}" for c in failed_checks(row)))
            bar.update(1)
    finally:
        rig.stop()
        bar.close()
    doc = {"date": stamp.isoformat(timespec="seconds"), "command": _command(args), "machine": report.machine(),
           "settings": asdict(settings), "setup_s": round(setup_s, 1),
           "total_s": round(time.monotonic() - started, 1), "scenarios": results,
           "known_issues": [asdict(i) for i in inputs.KNOWN_ISSUES],
           "unit_issues": [asdict(i) for i in inputs.UNIT_ISSUES],
           "swap_issues": [asdict(i) for i in inputs.SWAP_ISSUES],
           "passed": all(r["passed"] for r in results)}
    report.write(doc, args.out, args.markdown)
    print(f"wrote {args.out} and {args.markdown} ({doc['total_s']:.0f} s)")
    return 0 if doc["passed"] else 1


def _command(args: argparse.Namespace) -> str:
    if args.only or args.soak_s:
        return "python -m benchmarks.reliability " + " ".join(sys.argv[1:])
    return "make reliability" + (" QUICK=1" if args.quick else "")
