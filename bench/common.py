"""What every benchmark module shares: the ``--smoke``/``--results`` options, writing a section
of ``bench/results.json`` (and its headline ``summary``), Markdown tables and spreads.

``--smoke`` runs a module at tiny sizes in seconds, to keep it working
(``tests/integration/test_bench_smoke.py`` runs every module so); its figures mean nothing, so
a smoke run never writes ``bench/results.json`` unless ``--results`` names a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS",
    "SUMMARY_KEYS",
    "add_run_options",
    "cpu_busy",
    "demo_hub",
    "results_path",
    "spread",
    "summary_of",
    "table",
    "write_section",
]

RESULTS = Path(__file__).with_name("results.json")

SUMMARY_KEYS: tuple[str, ...] = (
    "worker_rps",
    "worker_vs_raw_ratio",
    "worker_vs_floor_ratio",
    "processes_2_speedup",
    "added_latency_p50_ms",
    "added_latency_p99_ms",
    "window64_efficiency",
    "settlement_records_per_s_sqlite",
    "settlement_records_per_s_postgres",
    "settlement_2_consumers_speedup",
    "vllm_worker_vs_alone_ratio",
)
"""The headline figures, in ``results.json``'s ``summary`` (null where not measured)."""


def add_run_options(parser: argparse.ArgumentParser, *, hub: bool = False) -> None:
    if hub:
        parser.add_argument(
            "--hub",
            type=Path,
            default=None,
            help="a demo hub built already (copied, never changed); default: built for the run",
        )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds: keeps the benchmark working"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results file to write the section into (default bench/results.json; "
        "a smoke run writes nothing unless this is given)",
    )


def results_path(args: argparse.Namespace) -> Path | None:
    """Where this run's figures go: ``--results``, else ``RESULTS`` unless smoke."""
    if args.results is not None:
        return Path(args.results)
    return None if args.smoke else RESULTS


def demo_hub(work: Path, source: Path | None) -> Path:
    """A demo hub of this run's own under ``work`` (a copy of ``source`` when given: building
    the demo LM takes seconds; the copy is checked, and rebuilt where it differs)."""
    from infra.dev.demo_models import build_demo_hub

    hub = work / "hub"
    if source is not None:
        shutil.copytree(source, hub)
    build_demo_hub(hub)
    return hub


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle


def cpu_busy(interval_s: float = 0.5) -> float | None:
    """The machine's CPU busy fraction over ``interval_s`` (every process, all cores; None
    where /proc/stat is missing): how quiet the machine is before a measurement."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval_s)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1 - (idle1 - idle0) / total if total > 0 else None


def summary_of(existing: Any) -> dict[str, Any]:
    """``existing`` with exactly ``SUMMARY_KEYS`` (null where missing or not a number)."""
    old = existing if isinstance(existing, dict) else {}
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        value = old.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        out[key] = value if ok else None
    return out


def write_section(
    path: Path | None, name: str, section: dict[str, Any], summary: dict[str, Any]
) -> None:
    """Put ``section`` under ``name`` in ``path`` and merge ``summary`` into its ``summary``
    (keys outside ``SUMMARY_KEYS`` are refused: the summary's shape is fixed)."""
    unknown = set(summary) - set(SUMMARY_KEYS)
    if unknown:
        raise ValueError(f"not summary keys: {sorted(unknown)}")
    if path is None:
        return
    existing: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    existing[name] = section
    merged = summary_of(existing.get("summary"))
    merged.update(summary)
    existing["summary"] = merged
    path.write_text(json.dumps(existing, indent=2) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """``median (min-max)`` of ``values``."""
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return f"{med} (1 run)"
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"
