"""Model benchmarks: cold vs warm load per format, and ONNX requests per second.

Run with ``python -m bench.models`` (``--no-worker`` skips the broker part; ``--smoke``: ONNX
only, tiny sizes).

1. **Load** (``onnx``: demo-mlp, ``hf-causal-lm``: demo-lm). Every sample is a fresh Python
   process, as a restarting pod would be, timed in phases: importing the runtime, getting a
   verified model out of the shared cache (``materialize``), building the engine, and the
   first request. *Cold*: the cache is empty, so the model is fetched from the hub (a local
   directory here: I/O and hashing, no network), verified and published (an HF tar is
   unpacked). *Warm*: the entry is on the volume and only re-verified (full sha256).
2. **ONNX engine** requests/s, batch 1: one request in flight at a time, then 32 concurrently
   (every ``run`` goes through a thread, so this is what the worker's window can draw from one
   engine), next to bare ``InferenceSession.run`` calls as the ceiling.
3. **ONNX through the worker**: the intake benchmark's full path (decode, validate, run,
   hash, sign, two acknowledged produces, ordered commits) on the real broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_run_options, demo_hub, results_path, table, write_section
from schemas.requests import MLInput

_FORMATS = {"onnx": "demo-mlp", "hf-causal-lm": "demo-lm"}
_RUNTIME_MODULE = {"onnx": "onnxruntime", "hf-causal-lm": "transformers"}


def _child(fmt: str, hub: Path, cache_dir: Path) -> dict[str, float]:
    """One load, in this (fresh) process; seconds per phase."""
    t0 = time.perf_counter()
    __import__(_RUNTIME_MODULE[fmt])
    if fmt == "hf-causal-lm":
        __import__("torch")
    t1 = time.perf_counter()
    from worker.engines import load_engine
    from worker.modelstore.cache import ModelCache
    from worker.modelstore.local_hub import LocalHub

    hub_ = LocalHub(hub)
    ref = hub_.resolve(_FORMATS[fmt])
    cache = ModelCache(cache_dir, hub_)
    t2 = time.perf_counter()
    cached = cache.materialize(ref)
    t3 = time.perf_counter()

    async def load_and_run() -> tuple[float, float]:
        a = time.perf_counter()
        engine = await load_engine(ref, cached.path, on_close=cached.release)
        b = time.perf_counter()
        from schemas.requests import ChatInput, MLInput

        payload = (
            MLInput.model_validate(ref.example_input)
            if fmt == "onnx"
            else ChatInput.model_validate(ref.example_input)
        )
        await engine.run(payload)
        c = time.perf_counter()
        await engine.close()
        return b - a, c - b

    load_s, first_s = asyncio.run(load_and_run())
    return {
        "import_s": t1 - t0,
        "materialize_s": t3 - t2,
        "load_s": load_s,
        "first_run_s": first_s,
        "hit": float(cached.hit),
    }


def _sample(fmt: str, hub: Path, cache_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.models", "--child", fmt, str(hub), str(cache_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    sample: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return sample


def bench_loads(
    hub: Path, work: Path, repeats: int, formats: list[str]
) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for fmt in formats:
        cold, warm = [], []
        for i in range(repeats):
            cache_dir = work / f"cache-{fmt}-{i}"
            cold.append(_sample(fmt, hub, cache_dir))
            warm.append(_sample(fmt, hub, cache_dir))
        assert all(s["hit"] == 0 for s in cold) and all(s["hit"] == 1 for s in warm)
        results[fmt] = {"cold": _median(cold), "warm": _median(warm)}
    return results


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "hit"}


async def bench_onnx_engine(hub: Path, work: Path, seconds: float) -> dict[str, float]:
    from worker.engines import load_engine
    from worker.modelstore.cache import ModelCache
    from worker.modelstore.local_hub import LocalHub

    hub_ = LocalHub(hub)
    ref = hub_.resolve("demo-mlp")
    cached = ModelCache(work / "cache-rps", hub_).materialize(ref)
    engine = await load_engine(ref, cached.path, on_close=cached.release)
    payload = MLInput.model_validate(ref.example_input)

    async def sequential() -> float:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            await engine.run(payload)
            n += 1
        return n / seconds

    async def concurrent(in_flight: int) -> float:
        n, end = 0, time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal n
            while time.perf_counter() < end:
                await engine.run(payload)
                n += 1

        await asyncio.gather(*(loop() for _ in range(in_flight)))
        return n / seconds

    import numpy as np
    import onnxruntime  # type: ignore[import-untyped,unused-ignore]

    session = onnxruntime.InferenceSession(str(cached.path), providers=["CPUExecutionProvider"])
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        session.run(None, {"x": x})
        n += 1
    result = {
        "engine, 1 in flight": await sequential(),
        "engine, 32 in flight": await concurrent(32),
        "bare InferenceSession.run": n / seconds,
    }
    await engine.close()
    return result


async def bench_onnx_worker(hub: Path, work: Path, n: int) -> float:
    from bench.intake import corpus, run_worker
    from infra.dev.broker import running_broker

    with running_broker(log_dir=work) as broker:
        run = await run_worker(broker.bootstrap, hub, "demo-mlp", corpus(n), 4, 64, work)
    return run.rps


def _print_tables(loads: dict[str, Any], rps: dict[str, float], worker_rps: float | None) -> None:
    print("\nModel load (median of fresh processes; ms; total = materialize + load + 1st run)")
    rows = []
    for fmt, by_kind in loads.items():
        for kind, s in by_kind.items():
            total = s["materialize_s"] + s["load_s"] + s["first_run_s"]
            rows.append(
                [
                    fmt,
                    kind,
                    *(
                        f"{s[k] * 1e3:.1f}"
                        for k in ("import_s", "materialize_s", "load_s", "first_run_s")
                    ),
                    f"{total * 1e3:.1f}",
                ]
            )
    print(table(["format", "cache", "import", "materialize", "load", "1st run", "total"], rows))
    bare = rps["bare InferenceSession.run"]
    print("\nONNX demo-mlp, batch 1 (requests/s; against bare InferenceSession.run, same run)")
    rows = [[name, f"{value:,.0f}", f"{value / bare:.3f}"] for name, value in rps.items()]
    if worker_rps is not None:
        rows.append(
            ["through the worker (broker)", f"{worker_rps:,.0f}", f"{worker_rps / bare:.3f}"]
        )
    print(table(["path", "req/s", "vs bare"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_options(parser, hub=True)
    parser.add_argument(
        "--child", nargs=3, metavar=("FORMAT", "HUB", "CACHE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--onnx-seconds", type=float, default=3.0)
    parser.add_argument("--worker-requests", type=int, default=2000)
    parser.add_argument("--no-worker", action="store_true")
    parser.add_argument("--formats", nargs="+", default=list(_FORMATS), choices=list(_FORMATS))
    args = parser.parse_args()
    if args.child:
        fmt, hub, cache = args.child
        print(json.dumps(_child(fmt, Path(hub), Path(cache))))
        return
    if args.smoke:  # the LM's loads take seconds each: ONNX only
        args.repeats, args.onnx_seconds, args.worker_requests = 1, 0.2, 300
        args.formats = ["onnx"]

    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        work = Path(tmp)
        hub = demo_hub(work, args.hub)
        loads = bench_loads(hub, work, args.repeats, args.formats)
        rps = asyncio.run(bench_onnx_engine(hub, work, args.onnx_seconds))
        (work / "worker").mkdir()
        worker_rps = (
            None
            if args.no_worker
            else asyncio.run(bench_onnx_worker(hub, work / "worker", args.worker_requests))
        )
    _print_tables(loads, rps, worker_rps)
    section = {
        "smoke": args.smoke,
        "repeats": args.repeats,
        "loads": loads,
        "onnx_rps": rps,
        "worker_rps": worker_rps,
        "worker_requests": args.worker_requests,
    }
    write_section(results_path(args), "models", section, {})


if __name__ == "__main__":
    main()
