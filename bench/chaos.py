"""Fault harness (``make chaos``): process kills, broker faults and hostile input, while traffic
flows; afterwards, per scenario, what was sent, answered, lost, delivered twice, dead-lettered,
rejected by settlement, and how many processes crashed.

Scenarios (``--only`` picks some):

- ``workers``: two ``inference-node worker`` processes; one that owns partitions is SIGKILLed
  and restarted every few seconds (jittered) while a paced stream of requests arrives
  (``bench.chaos_kill``). Duplicates appear only when a kill lands between an answer and the
  commit covering it (commits run every 100 ms), so their number varies run to run.
- ``settlement``: ``inference-node settlement run`` (SQLite ledger) SIGKILLed and restarted
  every few seconds, every third instance armed to die between ledger write and offset commit,
  while a worker publishes records; afterwards every record must be in the ledger exactly once.
- ``broker``: librdkafka's mock cluster with a broker down and up, partition leaders moving,
  and injected request errors, against an in-process worker (``bench.chaos_broker``).
- ``corpus``: ``tests.harness.corpus`` (malformed and hostile messages) sent to a worker's request
  topic and to the settlement topic, each classified against the outcome it is owed. The
  worker and settlement processes are restarted when they crash, as an orchestrator would, up
  to three times each: a message that crashes a service on every redelivery shows up as
  crashes, crash loops and lost (or duplicated) answers.
- ``fuzz``: the fuzzer's records (``tests.harness.hostile``, a fixed number drawn with a fixed
  seed) and the hand-written corpus's request cases against two worker processes, judged as
  the in-memory fuzz test judges them (``bench.chaos_fuzz``); crash loops counted. The
  in-memory fuzz test itself runs with ``HYPOTHESIS_PROFILE=chaos`` first (many examples).

A *crash loop* is a process that exits on its own, is restarted, and exits again before its
service made any progress (committed offsets, ledger rows): a message that stops it for good.

``--smoke``: every scenario at tiny sizes (under a minute), the table printed, nothing written
unless ``--output`` says where; exit status 1 when a target is missed.

Writes ``bench/chaos.json`` and the table between the chaos markers of ``BENCHMARKS.md``.
Targets: lost = 0, crashes = 0 and crash loops = 0 in every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.chaos_broker import FAULTS, broker_fault
from bench.chaos_fuzz import fuzz_scenario
from bench.chaos_kill import settlement_kill_loop, worker_kill_loop
from bench.chaos_support import (
    MODEL,
    Child,
    Progress,
    Row,
    crash_notes,
    fast_kafka,
    group_progress,
    ledger_rows,
    new_namespace,
    settlement_env,
    start_all,
    supervise,
    worker_env,
)
from bench.report import CHAOS_END, CHAOS_START, replace_section
from infra.dev.broker import running_broker
from infra.dev.demo_models import build_demo_hub
from schemas.sealing import NodeSealer
from schemas.topics import Topics
from tests.harness.corpus import CANARY, CorpusContext, hostile_corpus
from tests.harness.outcomes import TopicTap, classify_requests, classify_settlement, send_corpus
from worker.modelstore.local_hub import LocalHub
from worker.trust.keys import load_or_create_seed

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "chaos.json"
MARKDOWN = HERE.parent / "BENCHMARKS.md"
SCENARIOS = ("workers", "settlement", "broker", "corpus", "fuzz")
COLUMNS = [
    "scenario",
    "sent",
    "answered",
    "lost",
    "duplicates delivered",
    "DLQ'd",
    "rejected by settlement",
    "process crashes",
    "crash loops",
]
SMOKE = {
    "worker_requests": 40,
    "worker_rate": 40.0,
    "worker_kill_every_s": 1.0,
    "settlement_requests": 30,
    "settlement_rate": 40.0,
    "settlement_kill_every_s": 1.0,
    "broker_requests": 160,
    "broker_rate": 80.0,
    "broker_faults": ["partition leaders move (twice)"],
    "corpus_timeout_s": 20.0,
    "fuzz_records": 25,
    "fuzz_examples": 0,
    "fuzz_timeout_s": 30.0,
}
"""``--smoke`` sizes: every scenario, well under a minute in all."""


async def corpus_scenario(bootstrap: str, hub: Path, work: Path, *, timeout_s: float) -> Row:
    topics = await new_namespace(bootstrap, "cc")
    kafka = fast_kafka(bootstrap)
    run = work / topics.namespace
    state, ledger = run / "node", run / "ledger.sqlite3"
    worker = Child("worker", "worker", worker_env(bootstrap, topics, hub, state), run)
    settlement = Child("settlement", "settlement", settlement_env(bootstrap, topics, ledger), run)
    started = time.monotonic()
    await start_all([worker, settlement])
    keys = state / "keys"
    ctx = CorpusContext(
        topics,
        NodeSealer(load_or_create_seed(keys / "node_x25519.key")).public_key_hex,
        model=MODEL,
        node_seed=load_or_create_seed(keys / "node_ed25519.key"),
        chain_key=load_or_create_seed(keys / "node_secp256k1.key"),
        model_digest=LocalHub(hub).resolve(MODEL).digest,
    )
    cases = hostile_corpus(ctx)
    loops: list[str] = []
    async with TopicTap(kafka, topics.replies) as replies, TopicTap(kafka, topics.dlq) as dlq:
        supervisor = asyncio.create_task(
            supervise(
                [worker, settlement],
                max_restarts=3,
                progress=_corpus_progress(bootstrap, topics, ledger),
                loops=loops,
            )
        )
        try:
            sent = await send_corpus(kafka, topics, MODEL, cases)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                requests, leaks = classify_requests(sent, replies.messages, dlq.messages)
                records = classify_settlement(ledger, sent)
                if not any(o.lost for o in requests + records):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # late duplicates
            requests, leaks = classify_requests(sent, replies.messages, dlq.messages)
            records = classify_settlement(ledger, sent)
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            for child in (worker, settlement):
                await child.terminate(20)
    observed = requests + records
    logs = [p for p in run.glob("*.log") if CANARY.encode() in p.read_bytes()]
    return Row(
        "hostile corpus (worker + settlement)",
        sent=len(cases),
        answered=sum(o.observed.startswith(("error:", "result", "stored")) for o in observed),
        lost=sum(o.lost for o in observed),
        duplicates=sum(o.answers > 1 for o in observed),
        dlq=sum(o.observed.startswith("dlq:") for o in observed),
        rejected=sum(o.observed.startswith("rejected:") for o in observed),
        crashes=len(worker.crashes) + len(settlement.crashes),
        crash_loops=len(loops),
        notes={
            "request_cases": len(requests),
            "settlement_cases": len(records),
            "mismatches": [
                {"case": o.name, "expected": o.expected, "observed": o.observed}
                for o in observed
                if o.observed != o.expected and not o.lost
            ],
            "lost_cases": [o.name for o in observed if o.lost],
            "canary_in_clear": leaks,
            "logs_with_canary": [p.name for p in logs],
            "crash_details": crash_notes([worker, settlement]),
            "cases": [dataclasses.asdict(o) for o in observed],
            "wall_s": round(time.monotonic() - started, 1),
        },
    )


def _corpus_progress(bootstrap: str, topics: Topics, ledger: Path) -> Progress:
    """The worker group's committed offsets and the ledger's rows and rejections."""
    offsets = group_progress(bootstrap, f"{topics.namespace}-workers", topics.infer(MODEL))

    async def progress() -> object:
        return await offsets(), ledger_rows(ledger)

    return progress


_FUZZ_TEST = "test_no_generated_record_stops_the_intake_or_goes_unanswered"


def fuzz_in_memory(examples: int) -> Row:
    """The in-memory fuzz test (tests/contract/test_hostile_records.py) at ``examples``."""
    started = time.monotonic()
    env = os.environ | {"HYPOTHESIS_PROFILE": "chaos", "OG_FUZZ_EXAMPLES": str(examples)}
    test = "tests/contract/test_hostile_records.py::" + _FUZZ_TEST
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:logging", test],
        cwd=HERE.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    failed = done.returncode != 0
    return Row(
        "fuzzer in memory (hypothesis, real intake)",
        sent=examples,
        answered=0 if failed else examples,
        lost=int(failed),
        notes={
            "examples": examples,
            "passed": not failed,
            "output_tail": done.stdout.splitlines()[-30:] if failed else [],
            "wall_s": round(time.monotonic() - started, 1),
        },
    )


async def main_async(args: argparse.Namespace) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="og-chaos-"))
    try:
        return await _scenarios(args, work)
    finally:
        if args.keep_work:
            print(f"logs and ledgers kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def _scenarios(args: argparse.Namespace, work: Path) -> list[Row]:
    hub = work / "hub"
    await asyncio.to_thread(build_demo_hub, hub)
    rows: list[Row] = []

    async def done(run: Awaitable[Row]) -> Row:
        row = await run
        print(f"  {row.scenario}: {_cells(row)[1:]}", flush=True)
        return row

    with running_broker(log_dir=work) as broker:
        b = broker.bootstrap
        on_tansu: list[Callable[[], Awaitable[Row]]] = []
        if "workers" in args.only:
            on_tansu.append(
                lambda: worker_kill_loop(
                    b,
                    hub,
                    work,
                    requests=args.worker_requests,
                    rate_per_s=args.worker_rate,
                    kill_every_s=args.worker_kill_every_s,
                )
            )
        if "settlement" in args.only:
            on_tansu.append(
                lambda: settlement_kill_loop(
                    b,
                    hub,
                    work,
                    requests=args.settlement_requests,
                    rate_per_s=args.settlement_rate,
                    kill_every_s=args.settlement_kill_every_s,
                )
            )
        if "corpus" in args.only:
            on_tansu.append(lambda: corpus_scenario(b, hub, work, timeout_s=args.corpus_timeout_s))
        if "fuzz" in args.only:
            if args.fuzz_examples:
                on_tansu.append(lambda: asyncio.to_thread(fuzz_in_memory, args.fuzz_examples))
            on_tansu.append(
                lambda: fuzz_scenario(
                    b,
                    hub,
                    work,
                    records=args.fuzz_records,
                    seed=args.fuzz_seed,
                    timeout_s=args.fuzz_timeout_s,
                )
            )
        if args.smoke:  # side by side (own namespaces, own processes): it is a smoke test
            rows += await asyncio.gather(*(done(scenario()) for scenario in on_tansu))
        else:  # one at a time: the figures are measured without interference
            for scenario in on_tansu:
                rows.append(await done(scenario()))
    if "broker" in args.only:
        for name in args.broker_faults:
            rows.append(
                await done(
                    broker_fault(
                        name, hub, work, requests=args.broker_requests, rate_per_s=args.broker_rate
                    )
                )
            )
    return rows


def _cells(row: Row) -> list[str]:
    return [
        row.scenario,
        *(
            str(v)
            for v in (
                row.sent,
                row.answered,
                row.lost,
                row.duplicates,
                row.dlq,
                row.rejected,
                row.crashes,
                row.crash_loops,
            )
        ),
    ]


def _causes(crash: dict[str, Any]) -> str:
    """Error types named in a crashed process's last log lines (never their messages)."""
    text = "\n".join(crash.get("log_tail", []))
    found = re.findall(r'"error(?:_type)?": "(\w+)"', text)
    found += re.findall(r"^(\w+(?:Error|Exception))\b", text, flags=re.MULTILINE)
    return ", ".join(dict.fromkeys(found)) or "see its log"


def totals(rows: list[Row]) -> tuple[int, int, int]:
    """Lost, process crashes and crash loops over ``rows``."""
    return (
        sum(r.lost for r in rows),
        sum(r.crashes for r in rows),
        sum(r.crash_loops for r in rows),
    )


def surprises(rows: list[Row]) -> list[str]:
    """What a smoke run must not show beyond the totals: a case answered otherwise than the
    corpus expects (the check it names did not run), request data in clear in the DLQ or logs."""
    found = []
    for row in rows:
        for key in ("mismatches", "canary_in_clear", "logs_with_canary"):
            if row.notes.get(key):
                found.append(f"{row.scenario}: {key}")
    return found


def markdown(rows: list[Row], runtime_s: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lost, crashes, loops = totals(rows)
    verdict = "met" if lost == crashes == loops == 0 else "NOT met"
    out = [
        *lines,
        "",
        f"Target lost = 0, process crashes = 0 and crash loops = 0: **{verdict}** (lost "
        f"{lost}, crashes {crashes}, crash loops {loops}). Run time {runtime_s:.0f} s.",
        "",
        "Answered: a terminal reply (result or typed error) for request-shaped messages, a "
        "ledger row for settlement records. Duplicates delivered: request ids (or records) "
        "with more than one terminal reply (or ledger row); after a SIGKILL the redelivered "
        "window is answered again by design, with the same request id. Crash loops: a "
        "process that exited on its own, was restarted, and exited again before its service "
        "made progress. The in-memory fuzzer's row counts hypothesis examples (a failing one "
        "counts as lost); the fuzzed records' row counts records: there several records carry "
        "one request id on purpose (a malformed copy is owed its own typed error besides the "
        "whole request's answer), so its duplicates are ids owed and given more than one "
        "reply; an id given more replies than it is owed, or run twice by one node, is a "
        "problem listed below the table.",
    ]
    for row in rows:
        problems = row.notes.get("problems")
        if problems:
            out.append("")
            out.append(f"Problems ({row.scenario}):")
            out += [f"- {p}" for p in problems]
        mismatches = row.notes.get("mismatches")
        if mismatches:
            out.append("")
            out.append(f"Outcome differs from the corpus' expectation ({row.scenario}):")
            out += [
                f"- `{m['case']}`: expected {m['expected']}, got {m['observed']}"
                for m in mismatches
            ]
        details = row.notes.get("crash_details") or []
        if details and isinstance(details[0], dict):
            out.append("")
            out.append(f"Crashes ({row.scenario}):")
            out += [f"- {c['process']} exit {c['status']}: {_causes(c)}" for c in details]
        if row.notes.get("lost_cases"):
            out.append("")
            out.append(
                f"Lost ({row.scenario}): " + ", ".join(f"`{n}`" for n in row.notes["lost_cases"])
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--worker-requests", type=int, default=2000)
    parser.add_argument("--worker-rate", type=float, default=100.0, help="requests/s")
    parser.add_argument("--worker-kill-every-s", type=float, default=3.0)
    parser.add_argument("--settlement-requests", type=int, default=1200)
    parser.add_argument("--settlement-rate", type=float, default=60.0, help="requests/s")
    parser.add_argument("--settlement-kill-every-s", type=float, default=4.0)
    parser.add_argument("--broker-requests", type=int, default=400)
    parser.add_argument("--broker-rate", type=float, default=60.0, help="requests/s")
    parser.add_argument("--broker-faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--corpus-timeout-s", type=float, default=40.0)
    parser.add_argument("--fuzz-records", type=int, default=300, help="generated records")
    parser.add_argument("--fuzz-seed", type=int, default=17)
    parser.add_argument("--fuzz-timeout-s", type=float, default=90.0)
    parser.add_argument(
        "--fuzz-examples", type=int, default=1000, help="in-memory fuzzer examples (0: skip)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument("--keep-work", action="store_true", help="keep logs and ledgers")
    parser.add_argument("--output", type=Path, help=f"JSON results (default {OUTPUT})")
    parser.add_argument("--markdown", type=Path, help=f"table (default {MARKDOWN})")
    args = parser.parse_args()
    if args.smoke:  # nothing written unless asked; the tree's results stay the full run's
        vars(args).update(SMOKE)
    else:
        args.output = args.output or OUTPUT
        args.markdown = args.markdown or MARKDOWN
    # Faults are the point here: aiokafka's retry warnings would drown the table.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    started = time.monotonic()
    rows = asyncio.run(main_async(args))
    runtime_s = time.monotonic() - started
    table = markdown(rows, runtime_s)
    result: dict[str, Any] = {
        "generated_unix_s": int(time.time()),
        "runtime_s": round(runtime_s, 1),
        "params": {
            k: v for k, v in vars(args).items() if k not in {"output", "markdown", "keep_work"}
        },
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown is not None:
        replace_section(args.markdown, CHAOS_START, CHAOS_END, table)
    print()
    print(table)
    if args.smoke and (any(totals(rows)) or surprises(rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()
