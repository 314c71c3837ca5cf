"""A corpus of malformed and hostile messages, each with the outcome the node owes it.

Used by the fault harness (``bench.chaos``) and by ``tests/integration/test_hostile_corpus.py``.
``hostile_corpus(ctx)`` returns ``Case(name, raw, expected)`` tuples in the order they must be
sent (a replay follows the record it repeats). ``expected.target`` says where a case goes:

- ``request``: the request topic of ``ctx.model``. The node owes every such message a terminal
  answer: a typed ``ErrorReply`` (``outcome="error"``, ``detail`` = the ``ErrorCode`` value) to
  ``expected.request_id`` whenever a request id can be read from it, otherwise a DLQ entry
  (``outcome="dlq"``, ``detail`` = a prefix of the ``og-reason`` header). ``outcome="result"``
  marks a hostile-looking message that is in fact valid and must be answered with a result.
- ``settlement``: the settlement topic. ``outcome="rejected"`` (``detail`` = the rejection
  reason the ledger records) or ``outcome="stored"`` (one ledger row).

Messages carry a canary string where user data would be, so a consumer can check that the
canary never appears in clear in a DLQ entry or a log. ``raw`` is ``None`` for a tombstone
(a Kafka record without a value).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import nacl.utils
from nacl.public import PrivateKey
from nacl.secret import SecretBox

from client.requests import build_request
from schemas import limits
from schemas.base import SettlementMode, VerificationMode
from schemas.canonical import canonical_bytes
from schemas.codec import encode
from schemas.requests import InferenceRequest, MLInput
from schemas.results import Usage
from schemas.sealed import SealedPlaintext
from schemas.sealing import seal_request
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer
from schemas.topics import Topics
from schemas.version import SCHEMA_VERSION
from tests.harness.nodes import TestNode

__all__ = ["CANARY", "Case", "CorpusContext", "Expected", "hostile_corpus"]

CANARY = "canary-5c1e77"
Target = Literal["request", "settlement"]
Outcome = Literal["error", "result", "dlq", "rejected", "stored"]


@dataclass(frozen=True)
class Expected:
    target: Target
    outcome: Outcome
    detail: str = ""
    """ErrorCode value (error), og-reason prefix (dlq) or rejection reason (rejected)."""
    request_id: str | None = None
    """Where the reply goes for ``error``/``result``; None when no id can be read."""
    reply_key: bytes | None = None
    """A sealed case's one-time X25519 private key: its error comes sealed to it."""


class Case(NamedTuple):
    name: str
    raw: bytes | None
    expected: Expected


@dataclass(frozen=True)
class CorpusContext:
    topics: Topics
    node_x25519_hex: str
    """The worker's X25519 public key: sealed cases are addressed to it."""
    model: str = "demo-mlp"
    """Served by the worker; its request topic receives the request-shaped cases."""
    node_seed: bytes | None = None
    """The worker's ed25519 seed, to sign settlement records as a registered node would.
    None: a fixed key (that no registration names)."""
    chain_key: bytes | None = None
    """The worker's secp256k1 key (its records' chain signatures); None: derived from the
    seed as ``tests.harness.nodes.TestNode`` does."""
    model_digest: str | None = None
    """The digest the worker registered for ``model``: a record naming any other is refused as
    ``unregistered_model`` before the check a case is about. None: ``TestNode``'s default."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ml(data: list[Any] | None = None, shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "kind": "ml",
        "tensors": {
            "x": {
                "dtype": "float32",
                "shape": shape or [1, 4],
                "data": data if data is not None else [0.5, -1.0, 2.0, 0.25],
            }
        },
    }


class _Builder:
    def __init__(self, ctx: CorpusContext) -> None:
        self.ctx = ctx
        self.cases: list[Case] = []
        self.reply_keys: dict[str, bytes] = {}
        """Request id → the one-time key its (sealed) answer is sealed to."""

    def rid(self, name: str) -> str:
        return f"hc-{self.ctx.run_id}-{name}"

    def request(self, name: str, **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "type": "inference_request",
            "request_id": self.rid(name),
            "model": self.ctx.model,
            "mode": "VANILLA",
            "reply_to": self.ctx.topics.replies,
            "created_unix_ms": _now_ms(),
            "payload": _ml(),
        }
        doc.update(fields)
        return {k: v for k, v in doc.items() if v is not _DROP}

    def add(self, name: str, raw: bytes | None, expected: Expected) -> None:
        self.cases.append(Case(name, raw, expected))

    def error(self, name: str, code: str, raw: bytes | None = None, **fields: Any) -> None:
        """A request that must be answered with ``code``; ``raw`` overrides the encoding."""
        body = raw if raw is not None else json.dumps(self.request(name, **fields)).encode()
        rid = self.rid(name)
        expected = Expected("request", "error", code, rid, self.reply_keys.get(rid))
        self.add(name, body, expected)

    def dlq(self, name: str, reason: str, raw: bytes | None) -> None:
        self.add(name, raw, Expected("request", "dlq", reason))


_DROP = object()
"""Marks a field to leave out of ``_Builder.request``."""


def hostile_corpus(ctx: CorpusContext) -> list[Case]:
    """Every case, request-shaped first, then settlement-shaped; see the module docstring."""
    b = _Builder(ctx)
    _framing(b)
    _envelope_fields(b)
    _numbers_and_tensors(b)
    _routing(b)
    _sealed(b)
    _settlement(b)
    return b.cases


def _framing(b: _Builder) -> None:
    """Bytes that are not a JSON object, or too big or too deep to look at."""
    b.dlq("not_json", "not UTF-8 JSON", f"not json {CANARY}".encode())
    b.dlq("invalid_utf8", "not UTF-8 JSON", b'{"request_id": "\xff\xfe' + CANARY.encode() + b'"}')
    b.dlq("empty_bytes", "not UTF-8 JSON", b"")
    b.dlq("tombstone", "empty message", None)
    b.dlq("truncated_json", "not UTF-8 JSON", json.dumps(b.request("truncated")).encode()[:-7])
    b.dlq("json_array", "JSON list where an object", json.dumps([CANARY]).encode())
    b.dlq("json_string", "JSON str where an object", json.dumps(CANARY).encode())
    b.dlq("json_number", "JSON int where an object", b"42")
    b.dlq("json_null", "JSON NoneType where an object", b"null")
    b.dlq("deep_nesting_40", "JSON nested deeper", b'{"a":' + b"[" * 40 + b"]" * 40 + b"}")
    b.dlq("deep_nesting_100k", "JSON nested deeper", b"[" * 100_000)
    # Python refuses integers of more than 4,300 digits with a plain ValueError.
    b.dlq("int_5000_digits", "not UTF-8 JSON", b'{"request_id": ' + b"7" * 5000 + b"}")
    over = json.dumps(b.request("oversize", pad=CANARY * 90_000)).encode()
    b.dlq("oversize_1_1_mb", "message exceeds", over[: limits.MAX_MESSAGE_BYTES + 100_000])
    b.dlq("not_json_600_kb", "not UTF-8 JSON", b"{" + CANARY.encode() * 46_000)
    # Just under the limit: a whole, parseable request whose padding is an unknown field.
    doc = b.request("just_under_limit")
    fill = limits.MAX_MESSAGE_BYTES - len(json.dumps(doc | {"pad": ""}).encode()) - 10
    b.error("just_under_limit", "bad_request", json.dumps(doc | {"pad": "p" * fill}).encode())


def _envelope_fields(b: _Builder) -> None:
    """Missing, extra, mistyped or out-of-range fields of the request envelope."""
    no_id = b.request("no_id", request_id=_DROP, payer=CANARY)
    b.dlq("missing_request_id", "invalid message", json.dumps(no_id).encode())
    b.dlq("request_id_int", "invalid message", json.dumps(b.request("x", request_id=7)).encode())
    b.dlq(
        "request_id_bad_chars",
        "invalid message",
        json.dumps(b.request("x", request_id="a b/../c")).encode(),
    )
    b.dlq(
        "request_id_too_long",
        "invalid message",
        json.dumps(b.request("x", request_id="r" * (limits.MAX_ID_CHARS + 1))).encode(),
    )
    b.dlq(
        "request_id_null", "invalid message", json.dumps(b.request("x", request_id=None)).encode()
    )
    b.error("missing_model", "bad_request", model=_DROP)
    b.error("model_wrong_type", "bad_request", model=5)
    b.error("model_bad_name", "bad_request", model="Demo MLP!")
    # Not I-JSON (RFC 7493): nothing in it can be trusted, not even its request id.
    lone = json.dumps(b.request("model_lone_surrogate", model="demo-\ud800")).encode()
    b.dlq("model_lone_surrogate", "not UTF-8 JSON", lone)
    b.error("unknown_model", "unknown_model", model="not-served-anywhere")
    other = "demo-lm" if b.ctx.model != "demo-lm" else "demo-mlp"
    b.error("other_model_on_this_topic", "unknown_model", model=other)
    b.error("missing_payload", "bad_request", payload=_DROP)
    b.error("payload_unknown_kind", "bad_request", payload={"kind": "audio", "data": CANARY})
    b.error(
        "payload_chat_to_onnx",
        "bad_request",
        payload={"kind": "chat", "messages": [{"role": "user", "content": CANARY}]},
    )
    b.error("extra_top_level_field", "bad_request", evil=CANARY)
    b.error("schema_version_3", "bad_request", schema_version=3)
    b.error("schema_version_1", "bad_request", schema_version=1)
    b.error("wrong_message_type", "bad_request", type="inference_result")
    b.error("mode_unknown", "bad_request", mode="FAST")
    b.error("mode_lowercase", "bad_request", mode="vanilla")
    b.error("mode_tee_not_offered", "unsupported_mode", mode="TEE")
    b.error("deadline_expired", "deadline_exceeded", deadline_unix_ms=_now_ms() - 60_000)
    b.error("deadline_string", "bad_request", deadline_unix_ms="tomorrow")
    b.error("created_negative", "bad_request", created_unix_ms=-1)
    b.error("created_huge", "bad_request", created_unix_ms=10**30)
    b.error("payer_bad_chars", "bad_request", payer=f"{CANARY} <script>")
    # Replayed long after it was made, or dated ahead: refused before anything runs.
    b.error("created_two_days_ago", "stale_request", created_unix_ms=_now_ms() - 2 * 86_400_000)
    b.error("created_tomorrow", "stale_request", created_unix_ms=_now_ms() + 86_400_000)
    # A payer's signature copied onto another request (another id, so another grant).
    signed = json.loads(
        encode(
            build_request(
                b.ctx.model,
                MLInput.model_validate(_ml()),
                request_id=b.rid("payer_source"),
                payer_key=Signer(b"\x0b" * 32),
            )
        )
    )
    moved = b.request("payer_moved", payer=signed["payer"], payload=signed["payload"])
    b.error("payer_moved", "bad_payer", raw=json.dumps(moved).encode())
    forged = dict(signed["payer"], signature="ab" * 64)
    b.error("payer_forged_signature", "bad_payer", payer=forged, payload=signed["payload"])
    # ``stream`` is a strict boolean: "yes" is not silently read as true.
    b.error("stream_yes_string", "bad_request", stream="yes")


def _numbers_and_tensors(b: _Builder) -> None:
    """Numbers JSON can carry but the contract refuses, and tensors the model cannot take."""
    nan = json.dumps(b.request("nan_element", payload=_ml([float("nan"), 0, 0, 0]))).encode()
    b.dlq("nan_element", "not UTF-8 JSON", nan)  # NaN, Infinity and 1e400 are not JSON
    inf = json.dumps(b.request("infinity_element", payload=_ml([float("inf"), 0, 0, 0]))).encode()
    b.dlq("infinity_element", "not UTF-8 JSON", inf)
    big = json.dumps(b.request("float_1e400", payload=_ml([0.0, 0, 0, 0]))).encode()
    b.dlq("float_1e400", "not UTF-8 JSON", big.replace(b"[0.0, 0, 0, 0]", b"[1e400, 0, 0, 0]"))
    b.error("int_beyond_2_53", "bad_request", payload=_ml([2**60, 0, 0, 0]))
    b.error("float32_overflow", "bad_request", payload=_ml([1e39, 0, 0, 0]))
    b.error("bool_in_float_tensor", "bad_request", payload=_ml([True, 0, 0, 0]))
    b.error("shape_data_mismatch", "bad_request", payload=_ml([1.0, 2.0, 3.0]))
    b.error("negative_dimension", "bad_request", payload=_ml([], shape=[-1, 4]))
    b.error("rank_9", "bad_request", payload=_ml([1.0, 2, 3, 4], shape=[1] * 8 + [4]))
    b.error("wrong_rank_for_model", "bad_request", payload=_ml([1.0, 2, 3, 4], shape=[4]))
    b.error("wrong_width_for_model", "bad_request", payload=_ml([1.0] * 5, shape=[1, 5]))
    b.error(
        "too_many_elements",
        "bad_request",
        payload=_ml([0] * (limits.MAX_TENSOR_ELEMENTS + 4), shape=[16_385, 4]),
    )
    wrong = _ml()
    wrong["tensors"]["x"]["dtype"] = "int32"
    wrong["tensors"]["x"]["data"] = [1, 2, 3, 4]
    b.error("dtype_int32_for_float_model", "bad_request", payload=wrong)
    unknown_dtype = _ml()
    unknown_dtype["tensors"]["x"]["dtype"] = "complex64"
    b.error("dtype_unknown", "bad_request", payload=unknown_dtype)
    # Tensor names are the sender's (they may be private): a refusal must not repeat them.
    renamed = {"kind": "ml", "tensors": {CANARY: _ml()["tensors"]["x"]}}
    b.error("tensor_wrong_name", "bad_request", payload=renamed)
    added = _ml()
    added["tensors"][CANARY] = {"dtype": "float32", "shape": [1], "data": [1.0]}
    b.error("tensor_extra_name", "bad_request", payload=added)
    b.error("no_tensors", "bad_request", payload={"kind": "ml", "tensors": {}})
    b.error(
        "fixed_point_bad_decimals",
        "bad_request",
        payload=_ml([{"value": 1, "decimals": 99}, 0, 0, 0]),
    )
    extra = _ml()
    extra["tensors"]["x"]["note"] = CANARY
    b.error("tensor_extra_field", "bad_request", payload=extra)


def _routing(b: _Builder) -> None:
    """Reply topics a client must not be able to make a worker write to."""
    topics = b.ctx.topics
    b.error("reply_to_settlement", "reply_topic_refused", reply_to=topics.settlement)
    b.error("reply_to_registry", "reply_topic_refused", reply_to=topics.registry)
    b.error("reply_to_dlq", "reply_topic_refused", reply_to=topics.dlq)
    b.error("reply_to_request_topic", "reply_topic_refused", reply_to=topics.infer(b.ctx.model))
    b.error("reply_to_invalid_name", "bad_request", reply_to="../../etc/passwd")


def _sealed(b: _Builder) -> None:
    """Sealed payloads that do not open, or open to the wrong thing, on this node."""
    node_key = b.ctx.node_x25519_hex
    ml = MLInput.model_validate(_ml([0.1, 0.2, 0.3, 0.4]))

    def sealed_doc(name: str, recipients: list[str], **changes: Any) -> dict[str, Any]:
        request = InferenceRequest(
            request_id=b.rid(name),
            model=b.ctx.model,
            reply_to=b.ctx.topics.replies,
            created_unix_ms=_now_ms(),
            payload=ml,
        )
        sealed = seal_request(request, recipients)
        b.reply_keys[request.request_id] = bytes(sealed.reply_key)
        doc: dict[str, Any] = json.loads(encode(sealed.request))
        doc["payload"].update(changes)
        return doc

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    stranger = PrivateKey.generate().public_key.encode().hex()
    not_mine = sealed_doc("sealed_not_a_recipient", [stranger])
    b.error("sealed_not_a_recipient", "not_a_recipient", raw=json.dumps(not_mine).encode())
    doc = sealed_doc("sealed_tampered", [node_key])
    cipher = bytearray(base64.b64decode(doc["payload"]["ciphertext"]))
    cipher[-1] ^= 0x01
    doc["payload"]["ciphertext"] = b64(bytes(cipher))
    b.error("sealed_tampered", "bad_ciphertext", raw=json.dumps(doc).encode())
    short = sealed_doc("sealed_short", [node_key], ciphertext=b64(b"ABC"))
    b.error("sealed_short", "bad_ciphertext", raw=json.dumps(short).encode())
    bad_chars = sealed_doc("sealed_bad_base64", [node_key], ciphertext="%%not-base64%%")
    b.error("sealed_bad_base64", "bad_request", raw=json.dumps(bad_chars).encode())
    garbage_key = sealed_doc("sealed_garbage_key", [node_key])
    garbage_key["payload"]["recipients"][0]["sealed_key"] = b64(nacl.utils.random(80))
    b.error("sealed_garbage_key", "bad_ciphertext", raw=json.dumps(garbage_key).encode())
    bad_reply_key = sealed_doc("sealed_bad_reply_key", [node_key], reply_public_key="zz" * 32)
    b.error("sealed_bad_reply_key", "bad_request", raw=json.dumps(bad_reply_key).encode())
    streamed = sealed_doc("sealed_streamed", [node_key])
    streamed["stream"] = True
    # The clear "stream" differs from what was sealed: the node refuses to act on either.
    b.error("sealed_streamed", "sealed_mismatch", raw=json.dumps(streamed).encode())
    # Sealed for one request id, replayed under another.
    moved = sealed_doc("sealed_other_request", [node_key])
    moved["request_id"] = b.rid("sealed_moved")
    b.add(
        "sealed_replayed_under_other_id",
        json.dumps(moved).encode(),
        Expected(
            "request",
            "error",
            "bad_request",
            b.rid("sealed_moved"),
            b.reply_keys[b.rid("sealed_other_request")],
        ),
    )

    # Opens fine, binds the clear fields, but the plaintext inside is not a valid payload.
    def bound(doc: dict[str, Any]) -> bytes:
        plaintext = SealedPlaintext(
            request_id=doc["request_id"],
            model=doc["model"],
            mode=VerificationMode(doc["mode"]),
            settlement=SettlementMode(doc["settlement"]),
            reply_public_key=doc["payload"]["reply_public_key"],
            reply_to=doc["reply_to"],
            payer=None,
            created_unix_ms=doc["created_unix_ms"],
            deadline_unix_ms=None,
            stream=False,
            payload={"kind": "ml", "tensors": {}},
        )
        return canonical_bytes(plaintext)

    for name in ("sealed_inner_not_json", "sealed_inner_invalid"):
        doc = sealed_doc(name, [node_key])
        plaintext = f"not json {CANARY}".encode() if name.endswith("json") else bound(doc)
        content_key = nacl.utils.random(SecretBox.KEY_SIZE)
        doc["payload"]["recipients"] = [_recipient(node_key, content_key)]
        doc["payload"]["ciphertext"] = b64(bytes(SecretBox(content_key).encrypt(plaintext)))
        b.error(name, "bad_request", raw=json.dumps(doc).encode())


def _recipient(node_key_hex: str, content_key: bytes) -> dict[str, str]:
    from nacl.public import PublicKey, SealedBox

    sealed = SealedBox(PublicKey(bytes.fromhex(node_key_hex))).encrypt(content_key)
    return {"x25519_public_key": node_key_hex, "sealed_key": base64.b64encode(sealed).decode()}


def _settlement(b: _Builder) -> None:
    """Settlement records: undecodable, forged, tampered, from the future, replayed, unknown."""
    seed = b.ctx.node_seed or bytes([0x5E]) * 32
    chain_key = b.ctx.chain_key or hashlib.sha256(b"chain:" + seed).digest()
    node = TestNode(Signer(seed), ChainSigner(chain_key))
    stranger = TestNode(Signer(nacl.utils.random(32)), ChainSigner(nacl.utils.random(32)))
    forger = Signer(nacl.utils.random(32))

    def record(name: str, signer: TestNode, **env: Any) -> SettlementRecord:
        fields: dict[str, Any] = {
            "model_id": b.ctx.model,
            **({"model_digest": b.ctx.model_digest} if b.ctx.model_digest else {}),
            "input_hash": "01" * 32,
            "output_hash": "02" * 32,
            "usage": Usage(input_tokens=4, output_tokens=0),
        } | env
        return signer.record(b.rid(name), **fields)

    def add(name: str, raw: bytes | None, outcome: Outcome, detail: str = "") -> None:
        b.add(name, raw, Expected("settlement", outcome, detail))

    def nd(name: str, raw: bytes | None) -> None:
        add(name, raw, "rejected", "not_decodable")

    genuine = record("s_valid", node)
    doc = json.loads(encode(genuine))
    nd("s_not_json", f"not json {CANARY}".encode())
    nd("s_invalid_utf8", b'{"envelope": "\xff\xfe"}')
    nd("s_empty", b"")
    nd("s_tombstone", None)
    nd("s_json_array", b"[1, 2, 3]")
    nd("s_deep_nesting", b"[" * 100_000)
    nd("s_oversize", b'{"pad": "' + b"x" * (limits.MAX_MESSAGE_BYTES + 10_000) + b'"}')
    nd("s_int_5000_digits", b'{"signature": ' + b"9" * 5000 + b"}")
    nd("s_missing_signature", _dumps({k: v for k, v in doc.items() if k != "signature"}))
    nd("s_signature_wrong_length", _dumps(doc | {"signature": "ab" * 10}))
    nd("s_extra_field", _dumps(doc | {"bonus": 1}))
    nd("s_wrong_type", _dumps(doc | {"type": "inference_request"}))
    nd("s_schema_version_3", _dumps(doc | {"schema_version": 3}))
    nd("s_no_chain_signature", _dumps({k: v for k, v in doc.items() if k != "chain_signature"}))
    nd("s_node_id_not_hex", _dumps(_envelope_with(doc, node_id="zz" * 32)))
    nd("s_usage_nan", _dumps(_envelope_with(doc, usage={"input_tokens": float("nan")})))
    nd("s_usage_negative", _dumps(_envelope_with(doc, usage={"input_tokens": -5})))
    # Beyond the wire bounds, not only beyond what was signed: refused before any signature.
    beyond = {"input_tokens": 10**30, "output_tokens": 0}
    nd("s_usage_beyond_2_53", _dumps(_envelope_with(doc, usage=beyond)))
    tampered = _envelope_with(doc, output_hash="ff" * 32)
    add("s_tampered_envelope", json.dumps(tampered).encode(), "rejected", "bad_signature")
    wrong_chain = doc | {"chain_signature": stranger.chain.sign_digest(b"\x01" * 32)}
    add("s_bad_chain_signature", _dumps(wrong_chain), "rejected", "bad_chain_signature")
    over = record("s_over_budget", node, usage=Usage(input_tokens=4, output_tokens=1))
    add("s_over_budget", encode(over), "rejected", "over_budget")
    old = record("s_old", node, request_created_unix_ms=_now_ms() - 30 * 86_400_000)
    add("s_too_old", encode(old), "rejected", "too_old")
    forged_env = genuine.envelope.model_copy(update={"node_id": forger.node_id})
    forged = doc | {"signature": forger.sign_envelope(forged_env)}
    add("s_forged_signature", json.dumps(forged).encode(), "rejected", "bad_signature")
    add(
        "s_zero_signature",
        json.dumps(doc | {"signature": "00" * 64}).encode(),
        "rejected",
        "bad_signature",
    )
    future = record("s_future", node, signed_unix_ms=_now_ms() + 3_600_000)
    add("s_future_timestamp", encode(future), "rejected", "future_timestamp")
    add("s_unknown_node", encode(record("s_unknown", stranger)), "rejected", "unknown_node")
    add("s_valid", encode(genuine), "stored")
    add("s_replay", encode(genuine), "rejected", "replay")


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _envelope_with(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return doc | {"envelope": doc["envelope"] | changes}
