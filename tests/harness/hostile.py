"""Hypothesis strategies for hostile Kafka records: the fuzzer's half of the hostile corpus.

``tests.harness.corpus`` lists the messages we thought of; these strategies generate the ones we
did not. A ``HostileRecord`` is what a producer may put on a request topic: any value (bytes,
a tombstone, invalid UTF-8, huge or deeply nested JSON, a valid request with one field
mutated to an arbitrary value, a valid request of each kind), any key, any headers (arbitrary
names, ``og-attempts`` and ``traceparent`` included, null and binary values), or a record no
client can read at all (``unreadable``: a header key that is not UTF-8).

User-controlled places (prompts, mutated values, header values, keys, padding) carry ``CANARY``,
which is not a valid request id, model or topic name, so nothing the node may echo by design
(request ids, reply topics) can hold it: it must never appear in a reply, a DLQ entry (outside
the sealed payload) or a log line.

Used by the in-memory fuzz test and its fixed-seed Tansu sample
(``tests/contract/test_hostile_records.py``) and by ``bench.chaos`` (real worker processes).
``sample(ctx, n, seed)`` draws a reproducible list outside a test. What the node owes each
record, and the check of what it did, are in ``tests.harness.hostile_check``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from nacl.public import PrivateKey

from schemas import limits
from schemas.codec import encode
from schemas.requests import InferenceRequest
from schemas.sealing import seal_request
from schemas.topics import HEADER_ATTEMPTS, HEADER_SCHEMA_VERSION, HEADER_TRACEPARENT, Topics
from schemas.version import SCHEMA_VERSION

__all__ = [
    "CANARY",
    "CHAT_MODEL",
    "FUZZ_PROFILES",
    "ML_MODEL",
    "FuzzContext",
    "HostileRecord",
    "fuzz_settings",
    "hostile_batches",
    "hostile_records",
    "ml_payload",
    "request_doc",
    "sample",
]

CANARY = "canary 3f9a!"
"""Planted wherever user data goes; the space and ``!`` keep it out of every id pattern."""

ML_MODEL = "demo-mlp"
CHAT_MODEL = "demo-lm"

FUZZ_PROFILES: dict[str, dict[str, Any]] = {
    # make test: a few seconds. chaos (HYPOTHESIS_PROFILE=chaos, run by make chaos): minutes.
    "default": {"max_examples": 25},
    "chaos": {"max_examples": 1000},
}


def fuzz_settings(**overrides: Any) -> settings:
    """Settings of the fuzz tests for the profile named by ``HYPOTHESIS_PROFILE`` (``default``
    or ``chaos``; ``OG_FUZZ_EXAMPLES`` overrides the count). No example database: a failure
    prints its seed and its shrunk example."""
    profile = FUZZ_PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), {})
    if os.environ.get("OG_FUZZ_EXAMPLES"):  # bench.chaos sets it
        profile = profile | {"max_examples": int(os.environ["OG_FUZZ_EXAMPLES"])}
    return settings(
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **(profile | overrides),
    )


@dataclass(frozen=True)
class FuzzContext:
    """What the strategies build requests for: the namespace, the node's X25519 key (sealed
    requests), a prefix for request ids (unique per run: reply topics outside the namespace
    may be shared with other runs) and the clock."""

    topics: Topics
    node_x25519_hex: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    now_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    @property
    def client_topic(self) -> str:
        """A reply topic of the namespace that no deployment creates (a client's own)."""
        return f"{self.topics.namespace}.client-replies"


@dataclass(frozen=True)
class HostileRecord:
    """One record for the request topic of ``model``; ``kind`` names its generator."""

    kind: str
    model: str
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    unreadable: bool = False
    """Written so that no client can read it (its value and headers are then ignored)."""

    def __repr__(self) -> str:  # short in hypothesis' falsifying examples
        size = "None" if self.value is None else f"{len(self.value)} bytes"
        head = "" if self.value is None else repr(self.value[:160])
        return (
            f"HostileRecord({self.kind}, {self.model}, {size} {head}, key={self.key!r}, "
            f"headers={self.headers!r}, unreadable={self.unreadable})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' reports
        printer.text(repr(self))


# -- values: JSON -------------------------------------------------------------------------------

_canary_text = st.one_of(
    st.just(CANARY),
    st.builds(lambda a, b: a + CANARY + b, st.text(max_size=6), st.text(max_size=6)),
)
_text = st.one_of(st.text(max_size=24), _canary_text)
_floats = st.floats(allow_nan=True, allow_infinity=True)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    _floats,
    _text,
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=10,
)


def _tricky_strings(ctx: FuzzContext) -> st.SearchStrategy[str]:
    """Strings one character away from valid: a trailing newline (Python's ``$`` matches
    before it, pydantic's regex does not), internal topics, the other model, padding."""
    t = ctx.topics
    return st.sampled_from(
        [
            f"{ctx.run_id}-x\n",
            f"{t.replies}\n",
            f"{ML_MODEL}\n",
            t.settlement,
            t.dlq,
            t.registry,
            t.infer(ML_MODEL),
            t.infer(CHAT_MODEL),
            ML_MODEL,
            CHAT_MODEL,
            "TEE",
            "ZKML",
            "chat",
            "ml",
            "sealed",
            "float32",
            "string",
            "",
            " ",
            "\x00",
            "\ud800",
            "r" * (limits.MAX_ID_CHARS + 1),
        ]
    )


def _arbitrary(ctx: FuzzContext) -> st.SearchStrategy[Any]:
    return st.one_of(_json, _tricky_strings(ctx), st.integers(), _deep_value())


def _deep_value() -> st.SearchStrategy[Any]:
    def nest(depth: int) -> Any:
        value: Any = CANARY
        for _ in range(depth):
            value = [value]
        return value

    return st.integers(min_value=limits.MAX_JSON_DEPTH - 2, max_value=60).map(nest)


# -- values: requests ---------------------------------------------------------------------------


def ml_payload(rows: int = 1, value: float = 0.5) -> dict[str, Any]:
    """A ``demo-mlp`` input of ``rows`` rows (its output is three floats per row)."""
    x = {"dtype": "float32", "shape": [rows, 4], "data": [value] * (4 * rows)}
    return {"kind": "ml", "tensors": {"x": x}}


def request_doc(
    ctx: FuzzContext,
    request_id: str,
    model: str = ML_MODEL,
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A valid request document (``payload`` defaults to one ``demo-mlp`` row); ``fields``
    replace or add top-level fields, valid or not."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "inference_request",
        "request_id": request_id,
        "model": model,
        "mode": "VANILLA",
        "created_unix_ms": ctx.now_ms,
        "payload": payload if payload is not None else ml_payload(),
    } | fields


@st.composite
def _request_id(draw: st.DrawFn, ctx: FuzzContext) -> str:
    # A small pool per run: records often share an id (the duplicate path).
    return f"{ctx.run_id}-{draw(st.integers(min_value=0, max_value=40))}"


@st.composite
def _ml_payload(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.one_of(st.integers(min_value=1, max_value=4), st.sampled_from([300, 3000])))
    data = [draw(st.sampled_from([0.5, -1.0, 2.0, 0.25, 0, 1e-7]))] * (4 * rows)
    return {"kind": "ml", "tensors": {"x": {"dtype": "float32", "shape": [rows, 4], "data": data}}}


@st.composite
def _chat_payload(draw: st.DrawFn) -> dict[str, Any]:
    content = draw(st.text(max_size=20)) + CANARY
    payload: dict[str, Any] = {"kind": "chat", "messages": [{"role": "user", "content": content}]}
    if draw(st.booleans()):
        payload["params"] = {"max_tokens": draw(st.integers(1, 16)), "temperature": 0.0}
    return payload


@st.composite
def valid_request(draw: st.DrawFn, ctx: FuzzContext) -> tuple[str, str, dict[str, Any]]:
    """(kind, request topic's model, document) of a request the node can answer, maybe with a
    typed error: a mode it does not offer, a passed deadline, an internal reply topic, a sealed
    payload, another model."""
    rid = draw(_request_id(ctx))
    kind = draw(st.sampled_from(["ml", "chat", "chat_stream", "sealed", "variant"]))
    if kind == "ml":
        doc = request_doc(ctx, rid, ML_MODEL, draw(_ml_payload()))
    elif kind.startswith("chat"):
        doc = request_doc(ctx, rid, CHAT_MODEL, draw(_chat_payload()))
        doc["stream"] = kind == "chat_stream"
    elif kind == "sealed":
        plain = request_doc(ctx, rid, ML_MODEL, draw(_ml_payload()))
        to = draw(st.sampled_from([ctx.node_x25519_hex, _STRANGER]))
        sealed = seal_request(InferenceRequest.model_validate(plain), [to])
        doc = json.loads(encode(sealed.request))
    else:
        doc = request_doc(ctx, rid, ML_MODEL, draw(_ml_payload()))
        change = draw(
            st.sampled_from(
                [
                    {"mode": "TEE"},
                    {"mode": "ZKML"},
                    {"deadline_unix_ms": ctx.now_ms - 1},
                    {"deadline_unix_ms": ctx.now_ms + 600_000},
                    {"reply_to": ctx.topics.settlement},
                    {"model": CHAT_MODEL},
                    {"model": "not-served"},
                ]
            )
        )
        doc |= change
    topic_model = CHAT_MODEL if kind.startswith("chat") else ML_MODEL
    reply_to = draw(st.sampled_from([None, ctx.topics.replies, ctx.client_topic]))
    if reply_to is not None:
        doc.setdefault("reply_to", reply_to)
    return kind, topic_model, doc


_STRANGER = PrivateKey(b"\x07" * 32).public_key.encode().hex()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a JSON document (into objects and, for the first element, arrays)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, child in node.items():
            out.append((*prefix, key))
            out.extend(_paths(child, (*prefix, key)))
    elif isinstance(node, list) and node:
        out.append((*prefix, 0))
        out.extend(_paths(node[0], (*prefix, 0)))
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _replace(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if rest:
        copy[head] = _replace(copy[head], rest, value, delete=delete)
    elif delete:
        del copy[head]
    else:
        copy[head] = value
    return copy


@st.composite
def mutated_request(draw: st.DrawFn, ctx: FuzzContext) -> tuple[str, str, dict[str, Any]]:
    """A valid request with one field replaced by an arbitrary value, deleted, or an unknown
    field added next to it."""
    _, model, doc = draw(valid_request(ctx))
    path = draw(st.sampled_from(_paths(doc)))
    operation = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if operation == "add" and isinstance(_at(doc, path[:-1]), dict):
        key = draw(st.one_of(st.sampled_from(["pad", "evil", "request_id"]), _text))
        value = draw(_arbitrary(ctx))
        return "mutated", model, _replace(doc, (*path[:-1], key), value, delete=False)
    return (
        "mutated",
        model,
        _replace(doc, path, draw(_arbitrary(ctx)), delete=operation == "delete"),
    )


def _dumps(doc: Any, *, ascii_only: bool) -> bytes:
    # allow_nan: NaN/Infinity tokens are what a careless producer writes; surrogatepass: a
    # lone surrogate becomes invalid UTF-8 bytes instead of an error here.
    try:
        text = json.dumps(doc, ensure_ascii=ascii_only, allow_nan=True)
    except ValueError:  # an integer Python refuses to print (over 4,300 digits)
        return b'{"request_id": ' + b"7" * 5000 + b"}"
    return text.encode("utf-8", "surrogatepass")


@st.composite
def _request_bytes(draw: st.DrawFn, ctx: FuzzContext) -> tuple[str, str, bytes]:
    kind, model, doc = draw(st.one_of(valid_request(ctx), mutated_request(ctx)))
    raw = _dumps(doc, ascii_only=draw(st.booleans()))
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bad_utf8", "bom", "dup_key"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(min_value=0, max_value=max(0, len(raw) - 1)))]
    elif damage == "bad_utf8":
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:at] + b"\xff\xfe" + CANARY.encode() + raw[at:]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "dup_key":
        raw = raw[:-1] + b', "request_id": "' + f"{ctx.run_id}-dup".encode() + b'"}'
    return (kind if damage == "none" else f"{kind}+{damage}"), model, raw


@st.composite
def _framing_bytes(draw: st.DrawFn, ctx: FuzzContext) -> tuple[str, str, bytes | None]:
    """Values that are not a request at all: anything, nothing, too big, too deep."""
    model = draw(st.sampled_from([ML_MODEL, CHAT_MODEL]))
    kind = draw(st.sampled_from(["binary", "tombstone", "json", "huge", "deep", "deep_in_request"]))
    if kind == "binary":
        raw: bytes | None = draw(st.binary(max_size=64)) + draw(
            st.sampled_from([b"", CANARY.encode()])
        )
    elif kind == "tombstone":
        raw = None
    elif kind == "json":
        raw = _dumps(draw(_json), ascii_only=draw(st.booleans()))
    elif kind == "huge":
        size = draw(st.sampled_from([60_000, 420_000, limits.MAX_MESSAGE_BYTES + 1, 1_100_000]))
        doc = request_doc(ctx, draw(_request_id(ctx)), model, {"kind": "ml", "tensors": {}})
        head = _dumps(doc | {"pad": ""}, ascii_only=True)
        fill = max(0, size - len(head))
        raw = head[:-2] + (CANARY.encode() * (fill // len(CANARY) + 1))[:fill] + head[-2:]
    elif kind == "deep":
        depth = draw(st.sampled_from([limits.MAX_JSON_DEPTH + 1, 1000, 100_000]))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        raw = opener * depth
    else:
        depth = draw(st.integers(min_value=limits.MAX_JSON_DEPTH, max_value=5000))
        doc = request_doc(ctx, draw(_request_id(ctx)), model, {"kind": "ml", "tensors": {}})
        body = _dumps(doc, ascii_only=True)
        raw = body[:-1] + b', "pad": ' + b"[" * depth + b"]" * depth + b"}"
    return kind, model, raw


# -- keys and headers ---------------------------------------------------------------------------

_header_names = st.one_of(
    st.sampled_from([HEADER_ATTEMPTS, HEADER_TRACEPARENT, HEADER_SCHEMA_VERSION, "og-reason"]),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=16),
)
_VALID_TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_header_values = st.one_of(
    st.none(),
    st.binary(max_size=24),
    st.integers(min_value=0, max_value=10**8).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"-1", b"1e3", b"\xff", _VALID_TRACEPARENT, CANARY.encode()]),
)
_headers = st.lists(st.tuples(_header_names, _header_values), max_size=4).map(tuple)
_keys = st.one_of(st.none(), st.binary(max_size=16), st.just(CANARY.encode()))


@st.composite
def hostile_records(draw: st.DrawFn, ctx: FuzzContext) -> HostileRecord:
    """One hostile record (see the module docstring)."""
    if draw(st.integers(min_value=0, max_value=19)) == 0:
        return HostileRecord(
            "unreadable", draw(st.sampled_from([ML_MODEL, CHAT_MODEL])), None, unreadable=True
        )
    kind, model, value = draw(st.one_of(_request_bytes(ctx), _framing_bytes(ctx)))
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # on the other model's topic
        model = CHAT_MODEL if model == ML_MODEL else ML_MODEL
    return HostileRecord(kind, model, value, draw(_keys), draw(_headers))


def hostile_batches(ctx: FuzzContext, max_size: int = 12) -> st.SearchStrategy[list[HostileRecord]]:
    return st.lists(hostile_records(ctx), min_size=1, max_size=max_size)


_SAMPLE_CHUNK = 25
"""Records per drawn list: a long list overruns hypothesis' data buffer and comes out as the
simplest records (every one unreadable)."""


def sample(ctx: FuzzContext, n: int, seed: int) -> list[HostileRecord]:
    """``n`` records drawn with a fixed seed (the same kinds and shapes for the same seed and
    hypothesis version; ids, clock and sealing randomness come from ``ctx`` and the run)."""
    out: list[HostileRecord] = []
    for chunk in range(0, n, _SAMPLE_CHUNK):
        out += _sample_list(ctx, min(_SAMPLE_CHUNK, n - chunk), seed + chunk)
    return out


def _sample_list(ctx: FuzzContext, n: int, seed: int) -> list[HostileRecord]:
    drawn: list[list[HostileRecord]] = []

    # Hypothesis' first example is the simplest one (every record unreadable) and later ones
    # may be mutations of earlier ones: the third list is random and varied.
    @hypothesis_seed(seed)
    @settings(
        max_examples=3,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(hostile_records(ctx), min_size=n, max_size=n))
    def collect(records: list[HostileRecord]) -> None:
        drawn.append(records)

    collect()
    return drawn[-1]
