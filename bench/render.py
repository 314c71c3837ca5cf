"""Markdown for the benchmark sections ``bench.report`` puts in BENCHMARKS.md: intake, processes,
latency, settlement, attestation, models and ZKML (each from the section its module writes into
``bench/results.json``, or ``bench/zkml.json``)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import spread, table

__all__ = [
    "render_attestation",
    "render_intake",
    "render_latency",
    "render_models",
    "render_processes",
    "render_settlement",
    "render_zkml",
    "verdict",
]

INTAKE_TARGET_RATIO = 0.6


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def quietness(busy: list[float | None] | None) -> str:
    """How busy the machine was before each repetition (all processes, all cores)."""
    got = [b for b in busy or [] if b is not None]
    if not got:
        return "CPU busy before the runs: not recorded"
    return f"CPU busy before each repetition (all processes): {min(got):.0%}-{max(got):.0%}"


def render_intake(r: dict[str, Any]) -> str:
    t = r["throughput"]
    names = {
        "worker": "worker",
        "raw": "raw aiokafka loop (floor A)",
        "floor": "raw loop + crypto (floor B)",
    }
    ratios = {"raw": t["worker_vs_raw_per_run"], "floor": t["worker_vs_floor_per_run"]}
    rows = []
    for side, name in names.items():
        if side == "worker":
            rows.append([name, spread(t["rps"][side]), "-", spread(t["steady_rps"][side]), "-"])
            continue
        rows.append(
            [
                name,
                spread(t["rps"][side]),
                f"**{t[f'worker_vs_{side}_ratio']:.3f}** "
                f"(per run {spread(ratios[side], '{:.3f}')})",
                spread(t["steady_rps"][side]),
                f"{t[f'steady_worker_vs_{side}_ratio']:.3f}",
            ]
        )
    w = t["raw_with_window"]
    out = [
        f"{t['requests']:,} requests per run, {t['partitions']} partitions, {t['repeats']} runs "
        f"of each side, alternating (req/s, median (min-max)). Replies {t['reply_bytes']} B, "
        f"settlement records {t['record_bytes']} B keyed by {t['settlement_keying']}. "
        f"{quietness(t.get('cpu_busy_before'))}.",
        "",
        table(["side", "req/s", "worker / side", "req/s, middle 80 %", "worker / side"], rows),
        "",
        f"Floor A with the worker's window of {w['window']} per partition as well (1 run): "
        f"{w['rps']:,.0f} req/s ({w['steady_rps']:,.0f} over the middle 80 %).",
    ]
    for key, label in (
        ("window_scaling_50ms", "as shipped (consumer fetch wait 500 ms)"),
        ("window_scaling_50ms_fetch_wait_10ms", "consumer fetch wait 10 ms"),
    ):
        scaling = r.get(key) or []
        if not scaling:
            continue
        out += [
            "",
            f"Window scaling, fixed 50 ms engine, one partition, {label} (one run each):",
            "",
            table(
                ["window", "req/s", "ideal", "efficiency"],
                [
                    [
                        str(s["window"]),
                        f"{s['rps']:.0f}",
                        f"{s['ideal_rps']:.0f}",
                        f"{s['efficiency']:.0%}",
                    ]
                    for s in scaling
                ],
            ),
        ]
    return "\n".join(out)


def render_processes(r: dict[str, Any]) -> str:
    """``bench.processes``: one pod with ``--processes 1`` and ``--processes 2``."""
    one, *more = list(r["rps"])  # "1", then "2"
    per_run = spread(r["speedup_per_run"], "{:.2f}")
    rows = [[one, spread(r["rps"][one]), spread(r["steady_rps"][one]), "-", "-"]]
    rows += [
        [
            side,
            spread(r["rps"][side]),
            spread(r["steady_rps"][side]),
            f"**{r['speedup']:.2f}** (per run {per_run})",
            f"{r['steady_speedup']:.2f}",
        ]
        for side in more
    ]
    busy = [b for run in r["cpu_busy_before"].values() for b in run]
    return "\n".join(
        [
            f"{r['requests']:,} requests per run, {r['partitions']} partitions, {r['repeats']} "
            f"runs of each side, alternating, on {r['cores']} cores shared with the broker "
            f"(req/s, median (min-max)). Target: 2 processes >= {r['target_speedup']} x one: "
            f"{verdict(r['speedup'] >= r['target_speedup'])}. {quietness(busy)}.",
            "",
            table(
                [
                    "worker processes",
                    "req/s",
                    "req/s, middle 80 %",
                    "speedup (P=2 / P=1)",
                    "speedup, middle 80 %",
                ],
                rows,
            ),
        ]
    )


def _load(c: dict[str, Any]) -> str:
    shipped = " (as shipped)" if c["as_shipped"] else ""
    rate = f"{c['fraction']:.0%} ({c['rate_rps']:.0f} req/s)"
    return f"{rate}, fetch wait {c['fetch_max_wait_ms']} ms{shipped}"


def render_latency(r: dict[str, Any]) -> str:
    rows = []
    for c in r["configs"]:
        runs = c["runs"]
        rows.append(
            [
                _load(c),
                spread([x["p50_ms"] for x in runs["worker"]], "{:.1f}"),
                spread([x["p50_ms"] for x in runs["baseline"]], "{:.1f}"),
                f"**{c['added_p50_ms']:.1f}**",
                spread([x["p99_ms"] for x in runs["worker"]], "{:.1f}"),
                spread([x["p99_ms"] for x in runs["baseline"]], "{:.1f}"),
                f"**{c['added_p99_ms']:.1f}**",
            ]
        )
    stage_rows = []
    for c in r["configs"]:
        cells = []
        for stage in ("queue_wait", "pipeline", "publish", "end_to_end"):
            s = c["worker_stages"].get(stage)
            cells.append("-" if s is None else f"{s['mean_ms']:.1f} / {s['p99_ms']:.0f}")
        client = c["median"]["worker"]
        stage_rows.append([_load(c), *cells, f"{client['mean_ms']:.1f} / {client['p99_ms']:.0f}"])
    before = [x for c in r["configs"] for side in c["runs"].values() for x in side]
    busy = [x["cpu_busy_before"] for x in before if x.get("cpu_busy_before") is not None]
    quiet = (
        f"CPU busy before each run (all processes): {min(busy):.0%}-{max(busy):.0%} "
        f"over {len(busy)} runs"
        if busy
        else "CPU busy before the runs: not recorded"
    )
    return "\n".join(
        [
            f"Peak {r['peak_rps']:.0f} req/s (one worker process); open loop, {r['repeats']} x "
            f"{r['duration_s']:.0f} s per side and load, sides alternating. Milliseconds, "
            f"median (min-max) over runs. Targets at 50 %: added p50 <= {r['target_p50_ms']:.0f}, "
            f"p99 <= {r['target_p99_ms']:.0f}. {quiet}.",
            "",
            table(
                [
                    "load",
                    "worker p50",
                    "baseline p50",
                    "added p50",
                    "worker p99",
                    "baseline p99",
                    "added p99",
                ],
                rows,
            ),
            "",
            "Where the worker's time goes: its own histograms over the counted part of each run "
            "(median over runs of mean / ~p99 in ms; p99 interpolated in coarse buckets):",
            "",
            table(
                [
                    "load",
                    "queue wait",
                    "pipeline",
                    "publish (2 acks)",
                    "end to end",
                    "client-observed",
                ],
                stage_rows,
            ),
        ]
    )


def render_settlement(r: dict[str, Any]) -> str:
    rows = []
    for backend, by in r["runs"].items():
        one = r["records_per_s_median"][backend].get(f"1_consumer_by_{r['worker_keying']}")
        for key, runs in by.items():
            consumers, keying = key.split("_by_")
            rates = [x["records_per_s"] for x in runs]
            mark = "as the worker" if keying == r["worker_keying"] else "not as the worker"
            rows.append(
                [
                    backend,
                    consumers.split("_")[0],
                    f"{keying} ({mark})",
                    spread(rates),
                    f"{statistics.median(rates) / one:.2f}" if one else "-",
                    "/".join(str(p) for p in sorted({x["partitions_used"] for x in runs})),
                ]
            )
        rows.append(
            [
                backend,
                "-",
                f"`ledger.store` alone, {r['store_batch']}/call",
                spread(r["store_records_per_s"][backend]),
                "-",
                "-",
            ]
        )
    v = r["verification"]
    target = r.get("target_sqlite_records_per_s", 5000)
    return "\n".join(
        [
            f"{r['records']:,} records of {r['record_bytes']} B from one node, settlement topic "
            f"of {r['settlement_partitions']} partitions, {r['repeats']} runs (records/s, median "
            f"(min-max)). The worker keys settlement records by **{r['worker_keying']}**. "
            f"Target: SQLite, one consumer, >= {target} records/s. "
            f"{quietness(r.get('cpu_busy_before'))}.",
            "",
            table(
                [
                    "ledger",
                    "consumers",
                    "keyed by",
                    "records/s",
                    "vs 1 consumer",
                    "partitions used",
                ],
                rows,
            ),
            "",
            f"Verification per record, one core: `verify_record` (decode, bounds, ed25519) "
            f"{v['verify_record_us']:.0f} µs + EIP-191 recovery {v['chain_recover_us']:.0f} µs "
            f"= **{v['per_record_us']:.0f} µs** ({1e6 / v['per_record_us']:,.0f} records/s per "
            f"core); ed25519 verify alone {v['ed25519_verify_us']:.0f} µs, envelope digest "
            f"{v['envelope_digest_us']:.0f} µs.",
        ]
    )


def render_attestation(r: dict[str, Any]) -> str:
    rows = [
        [
            x["operation"],
            f"{x['per_s']:,.0f}",
            f"{x['p50_us']:.1f}",
            f"{x['p99_us']:.1f}",
            f"{x['bare_p50_us']:.1f}" if "bare_p50_us" in x else "-",
            f"{x['vs_bare']:.2f}" if "vs_bare" in x else "-",
        ]
        for x in r["rows"]
    ]
    return "\n".join(
        [
            f"{r['n']:,} runs per signature operation, {r['attest_n']} per attestation kind.",
            "",
            table(["operation", "per second", "p50 µs", "p99 µs", "bare p50 µs", "vs bare"], rows),
        ]
    )


def render_models(r: dict[str, Any]) -> str:
    rows = []
    for fmt, by_kind in r["loads"].items():
        for kind, s in by_kind.items():
            total = s["materialize_s"] + s["load_s"] + s["first_run_s"]
            rows.append(
                [fmt, kind]
                + [
                    f"{s[k] * 1e3:.1f}"
                    for k in ("import_s", "materialize_s", "load_s", "first_run_s")
                ]
                + [f"{total * 1e3:.1f}"]
            )
    bare = r["onnx_rps"]["bare InferenceSession.run"]
    rps_rows = [[k, f"{v:,.0f}", f"{v / bare:.3f}"] for k, v in r["onnx_rps"].items()]
    if r.get("worker_rps"):
        w = r["worker_rps"]
        rps_rows.append(
            [
                f"through the worker ({r['worker_requests']:,} requests)",
                f"{w:,.0f}",
                f"{w / bare:.3f}",
            ]
        )
    return "\n".join(
        [
            f"Loads: median of {r['repeats']} fresh processes (ms; total = materialize + load + "
            "first run).",
            "",
            table(["format", "cache", "import", "materialize", "load", "1st run", "total"], rows),
            "",
            "ONNX demo-mlp, batch 1 (requests/s):",
            "",
            table(["path", "req/s", "vs bare InferenceSession.run"], rps_rows),
        ]
    )


def render_zkml(rows: list[dict[str, Any]]) -> str:
    out = [
        [
            x["model"],
            x["config"],
            str(x["logrows"]),
            f"{x['setup_s']:.2f}",
            f"{x['prove_s']:.2f}",
            f"{x['worker_prove_s']:.2f}",
            f"{x['worker_prove_s'] / x['prove_s']:.2f}",
            f"{x['verify_ms']:.1f}",
            f"{x['record_check_ms']:.1f}",
            f"{x['proof_bytes']:,}",
            f"{x['pk_bytes']:,}",
        ]
        for x in rows
    ]
    return table(
        [
            "model",
            "config",
            "k",
            "setup s",
            "prove s (ezkl)",
            "worker prove s",
            "worker / ezkl",
            "verify ms",
            "record check ms",
            "proof B",
            "pk B",
        ],
        out,
    )
