"""``inference-node``: one entry point, one subcommand per job.

Exit codes: 0 success; 1 a check failed (error reply, verification failure, timeout);
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

__all__ = ["build_parser", "main"]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"inference-node: {message}\n")
    return code


# -- services -------------------------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    from infra.logs import configure_logging
    from worker.app import WorkerFatal, serve
    from worker.modelstore.service import ModelConfigError
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    configure_logging(settings.log_level)
    if args.processes > 1:
        from worker.processes import run_processes

        return asyncio.run(run_processes(settings, args.processes, args.ready_file))
    try:
        asyncio.run(serve(settings, args.ready_file))
    except WorkerFatal as e:
        return _fail(str(e), 1)
    except ModelConfigError as e:
        return _fail(str(e), 2)
    return 0


def _cmd_settlement(args: argparse.Namespace) -> int:
    from settlement.settings import SettlementSettings

    settings = SettlementSettings()
    if args.action == "run":
        from infra.logs import configure_logging
        from settlement.app import SettlementFatal, serve

        configure_logging(settings.log_level)
        try:
            asyncio.run(serve(settings, args.ready_file))
        except SettlementFatal as e:
            return _fail(str(e), 1)
        return 0
    from settlement.ledger import open_ledger

    ledger = open_ledger(settings.ledger_url)
    try:
        if args.action == "status":
            _print_json({"records": ledger.count(), "rejections": ledger.rejection_counts()})
            return 0
        if args.action == "usage":
            _print_json(ledger.usage(args.payer))
            return 0
        if not args.request_id:
            return _fail(f"settlement {args.action} needs a request id")
        if args.action == "proof":
            from infra.dev.stack import local_chain
            from settlement.inclusion import build_proofs

            chain = local_chain(settings.chain, args.state_dir)
            proofs = [
                p.model_dump(mode="json") for p in build_proofs(ledger, args.request_id, chain)
            ]
            if not proofs:
                return _fail("no anchored record for that request id (yet)", 1)
            _print_json(proofs[0] if len(proofs) == 1 else proofs)
            return 0
        if args.action == "receipt":
            from infra.dev.stack import local_chain
            from settlement.receipts import receipts_for

            chain = local_chain(settings.chain, args.state_dir)
            found = [
                r.model_dump(mode="json") for r in receipts_for(ledger, args.request_id, chain)
            ]
            if not found:
                return _fail("no settled record for that request id", 1)
            _print_json(found[0] if len(found) == 1 else found)
            return 0
        rows = ledger.get(args.request_id)
        _print_json(rows)
        return 0 if rows else 1
    finally:
        ledger.close()


def _cmd_stack(args: argparse.Namespace) -> int:
    from infra.dev.stack import StackConfig, stack_down, stack_status, stack_up

    cfg = StackConfig(
        state_dir=args.state_dir,
        port=args.port,
        namespace=args.namespace,
        chain_port=args.chain_port,
        worker_metrics_port=args.worker_metrics_port,
        settlement_metrics_port=args.settlement_metrics_port,
    )
    if args.action == "up":
        _print_json(stack_up(cfg))
    elif args.action == "down":
        _print_json(stack_down(cfg))
    else:
        status = stack_status(cfg)
        _print_json(status)
        return 0 if all(v.get("ready") for v in status.values() if isinstance(v, dict)) else 1
    return 0


# -- clients --------------------------------------------------------------------------------


def _read_json_arg(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    return json.loads(text)


def _client_settings(args: argparse.Namespace) -> Any:
    """``ClientSettings`` from ``OG_CLIENT_*`` with the command's options on top; admission
    from the chain of the local stack in ``--state-dir`` when none is configured."""
    from client import ClientSettings
    from infra.dev.stack import local_admission

    settings = ClientSettings()
    if args.bootstrap:
        settings.kafka.bootstrap_servers = args.bootstrap
    settings.admission = local_admission(settings.admission, args.state_dir)
    if getattr(args, "allow_dev", False):
        settings.attestation.allow_dev = True
    return settings


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap", help="Kafka bootstrap servers (default OG_CLIENT_KAFKA__...)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var"),
        help="local stack state: its NodeRegistry admits nodes when OG_CLIENT_ADMISSION__* "
        "names none",
    )


def _cmd_request(args: argparse.Namespace) -> int:
    from client import NoActiveNodes, ReplyTimeout, TrustUnavailable, parse_payload
    from client.oneshot import load_payer_key, request_once
    from schemas.base import SettlementMode, VerificationMode
    from schemas.codec import encode
    from schemas.results import InferenceResult, StreamChunk

    settings = _client_settings(args)
    try:
        if args.example:
            from worker.modelstore.local_hub import LocalHub

            raw_payload = LocalHub(args.hub_dir).resolve(args.model).example_input
        else:
            raw_payload = _read_json_arg(args.input)
        payload = parse_payload(raw_payload)
        payer_key = load_payer_key(args.payer_key) if args.payer_key else None
    except (OSError, KeyError, ValueError, ValidationError) as e:
        detail = e.error_count() if isinstance(e, ValidationError) else type(e).__name__
        return _fail(f"invalid request input ({detail})")

    def on_chunk(chunk: StreamChunk) -> None:
        sys.stderr.write(chunk.text)
        sys.stderr.flush()

    try:
        shot = asyncio.run(
            request_once(
                settings,
                args.model,
                payload,
                timeout_s=args.timeout_s or settings.timeout_s,
                deadline_s=args.deadline_s,
                mode=VerificationMode(args.mode),
                settlement=SettlementMode(args.settlement),
                payer_key=payer_key,
                sealed=args.sealed,
                stream=args.stream,
                on_chunk=on_chunk,
            )
        )
    except (ReplyTimeout, NoActiveNodes, TrustUnavailable) as e:
        return _fail(str(e), 1)
    if args.stream:
        sys.stderr.write("\n")
    if args.save_request:
        args.save_request.write_bytes(encode(shot.request))
    _print_json(shot.reply.model_dump(mode="json"))
    if not isinstance(shot.reply, InferenceResult):
        return 1
    if not shot.report.ok:
        sys.stderr.write(json.dumps(shot.report.as_dict()) + "\n")
        return _fail("reply failed verification", 1)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from nodecli.verify import run_verify

    return run_verify(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from nodecli.models import run_models

    return run_models(args)


def _cmd_keys(args: argparse.Namespace) -> int:
    from worker.identity import chain_address, node_signer
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    # What an admission authority admits: ``inference-node admission admit NODE_ID ADDRESS``.
    _print_json(
        {"node_id": node_signer(settings).node_id, "chain_address": chain_address(settings)}
    )
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from infra.kafka.client import ClusterKafka
    from worker.deadletters import list_dlq, replay_dlq
    from worker.identity import DLQ_KEY_FILE, dlq_private_key
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    if args.bootstrap:
        settings.kafka.bootstrap_servers = args.bootstrap
    kafka = ClusterKafka(settings.kafka)
    if args.action == "list":
        for line in asyncio.run(list_dlq(kafka, settings.topics)):
            sys.stdout.write(json.dumps(line.as_dict(), sort_keys=True) + "\n")
        return 0
    if not (settings.key_dir / DLQ_KEY_FILE).exists():
        return _fail(f"no DLQ private key at {settings.key_dir / DLQ_KEY_FILE}")
    offsets = None if args.all else set(args.offset)
    if offsets is not None and not offsets:
        return _fail("dlq replay needs --offset N (repeatable) or --all")
    key = dlq_private_key(settings)
    results = asyncio.run(replay_dlq(kafka, settings.topics, key, offsets))
    for result in results:
        sys.stdout.write(json.dumps(result.as_dict(), sort_keys=True) + "\n")
    return 0 if all(r.replayed for r in results) else 1


def _cmd_topics(args: argparse.Namespace) -> int:
    from infra.kafka.admin import ProvisioningError, ensure_topics
    from schemas.topics import standard_topics
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    specs = standard_topics(
        settings.namespace,
        args.models or settings.models,
        request_partitions=args.request_partitions,
        reply_partitions=args.reply_partitions,
        settlement_partitions=args.settlement_partitions,
        replication_factor=args.replication_factor,
        dlq_retention_ms=args.dlq_retention_ms,
    )
    if args.dry_run:
        _print_json([{"name": s.name, "partitions": s.partitions, **s.config} for s in specs])
        return 0
    try:
        created = asyncio.run(ensure_topics(settings.kafka, specs))
    except ProvisioningError as e:
        return _fail(str(e), 1)
    _print_json({"created": created, "checked": [s.name for s in specs]})
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from client.batch import BatchError, BatchOptions, batch_status, cancel_batch, submit_batch
    from infra.kafka.ports import KafkaPortError

    try:
        if args.action == "status":
            _print_json(batch_status(args.job_dir))
            return 0
        if args.action == "cancel":
            _print_json(cancel_batch(args.job_dir))
            return 0
        settings = _client_settings(args)
        try:
            options = BatchOptions(
                max_in_flight=args.max_in_flight,
                timeout_s=args.timeout_s or settings.timeout_s,
                deadline_s=args.deadline_s,
                include_requests=not args.no_requests,
            )
        except ValueError as e:
            return _fail(str(e))
        summary = submit_batch(args.file, args.out, settings, options)
    except BatchError as e:
        return _fail(str(e))
    except KafkaPortError as e:
        return _fail(f"the Kafka cluster failed ({type(e).__name__})", 1)
    _print_json(summary)
    return 0 if summary["status"] == "completed" else 1


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference-node", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run an inference worker (settings: OG_WORKER_*)")
    w.add_argument("--ready-file", type=Path)
    w.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes in this pod, sharing its identity and consumer group "
        "(metrics on METRICS_PORT + i)",
    )
    w.set_defaults(func=_cmd_worker)

    s = sub.add_parser("settlement", help="run or inspect the settlement service (OG_SETTLEMENT_*)")
    s.add_argument(
        "action",
        nargs="?",
        choices=["run", "status", "show", "proof", "receipt", "usage"],
        default="run",
        help="receipt ID: envelope, signatures, booking, mode, batch and inclusion proof",
    )
    s.add_argument("request_id", nargs="?")
    s.add_argument("--payer", help="usage: only this payer")
    s.add_argument(
        "--state-dir",
        type=Path,
        default=Path("var"),
        help="local stack state (proof, receipt: its contract)",
    )
    s.add_argument("--ready-file", type=Path)
    s.set_defaults(func=_cmd_settlement)

    st = sub.add_parser("stack", help="local development stack")
    st.add_argument("action", choices=["up", "down", "status"])
    st.add_argument("--state-dir", type=Path, default=Path("var"))
    st.add_argument("--port", type=int, default=9092, help="Kafka-API broker port")
    st.add_argument("--chain-port", type=int, default=8545, help="anvil JSON-RPC port")
    st.add_argument("--namespace", default="og")
    st.add_argument("--worker-metrics-port", type=int, default=9108, help="worker /readyz port")
    st.add_argument("--settlement-metrics-port", type=int, default=9109)
    st.set_defaults(func=_cmd_stack)

    r = sub.add_parser("request", help="send one request, print its reply (OG_CLIENT_*)")
    r.add_argument("--model", required=True)
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="payload JSON, or @FILE")
    source.add_argument("--example", action="store_true", help="the model's bundled example")
    r.add_argument("--hub-dir", type=Path, default=Path("var/hub"))
    _client_options(r)
    r.add_argument("--timeout-s", type=float)
    r.add_argument("--deadline-s", type=float)
    r.add_argument(
        "--payer-key",
        type=Path,
        help="sign the request as its payer: a file holding ed25519:<hex seed> or "
        "secp256k1:<hex key>",
    )
    r.add_argument("--settlement", choices=["batch", "individual", "private"], default="batch")
    r.add_argument(
        "--save-request", type=Path, help="also write the request (before sealing) to FILE"
    )
    r.add_argument(
        "--sealed",
        action="store_true",
        help="seal the payload to the active nodes serving the model; print the opened reply",
    )
    r.add_argument("--stream", action="store_true", help="stream text to stderr as it comes")
    r.add_argument("--mode", choices=["VANILLA", "TEE", "ZKML"], default="VANILLA")
    r.add_argument(
        "--allow-dev",
        action="store_true",
        help="count development attestations (no TEE) as attested: local stacks only",
    )
    r.set_defaults(func=_cmd_request)

    b = sub.add_parser("batch", help="batch jobs: a JSONL file of requests (OG_CLIENT_*)")
    batch = b.add_subparsers(dest="action", required=True)
    bs = batch.add_parser("submit", help="start a job, or resume the one in --out")
    bs.add_argument("file", type=Path, help="input JSONL: one request per line")
    bs.add_argument("--out", type=Path, required=True, help="job directory (state and outputs)")
    bs.add_argument("--max-in-flight", type=int, default=256)
    bs.add_argument("--deadline-s", type=float, help="deadline sent with each request")
    bs.add_argument("--timeout-s", type=float, help="wait per request (default OG_CLIENT_...)")
    _client_options(bs)
    bs.add_argument("--no-requests", action="store_true", help="leave requests out of outputs")
    for action, text in (("status", "counts of a job"), ("cancel", "stop a job")):
        batch.add_parser(action, help=text).add_argument("job_dir", type=Path)
    b.set_defaults(func=_cmd_batch)

    from nodecli.admission import add_parser as add_admission

    add_admission(sub)

    v = sub.add_parser(
        "verify",
        help="verify a reply offline, and/or its inclusion on chain (from an inclusion proof "
        "or a published batch)",
    )
    v.add_argument("reply", type=Path, nargs="?")
    v.add_argument("--request", type=Path, help="the request sent, to check the input hash")
    v.add_argument("--inclusion", type=Path, help="an inclusion proof (settlement proof ID)")
    v.add_argument(
        "--rpc-url",
        default="http://127.0.0.1:8545",
        help="chain RPC for --inclusion and --published-batch",
    )
    from nodecli.verify import add_arguments

    add_arguments(v)
    v.set_defaults(func=_cmd_verify)

    from nodecli.check import add_parser as add_check_parser

    add_check_parser(sub)
    from nodecli.models import add_models_parser

    add_models_parser(sub).set_defaults(func=_cmd_models)

    d = sub.add_parser("dlq", help="list or replay dead letters (OG_WORKER_* settings)")
    d.add_argument("action", choices=["list", "replay"])
    d.add_argument("--offset", type=int, action="append", default=[], help="DLQ offset to replay")
    d.add_argument("--all", action="store_true", help="replay every entry")
    d.add_argument("--bootstrap")
    d.set_defaults(func=_cmd_dlq)

    tp = sub.add_parser(
        "topics", help="create the deployment's topics (idempotent; OG_WORKER_* settings)"
    )
    tp.add_argument("action", choices=["ensure"])
    tp.add_argument("--models", nargs="*", help="model topics (default: OG_WORKER_MODELS)")
    tp.add_argument("--request-partitions", type=int, default=4)
    tp.add_argument("--reply-partitions", type=int, default=4)
    tp.add_argument("--settlement-partitions", type=int, default=4)
    tp.add_argument("--replication-factor", type=int, default=1)
    tp.add_argument("--dlq-retention-ms", type=int)
    tp.add_argument("--dry-run", action="store_true", help="print the specs, create nothing")
    tp.set_defaults(func=_cmd_topics)

    k = sub.add_parser("keys", help="node keys")
    k.add_argument("action", choices=["show"])
    k.set_defaults(func=_cmd_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors(include_input=False, include_url=False)
        ]
        return _fail("invalid settings:\n" + "\n".join(lines))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
