"""The protocol test vectors (``docs/vectors/results-v2.json``), recomputed from first principles
and checked against our verifiers, so docs/PROTOCOL.md, the vectors and the code agree.

The first half uses nothing from this repository: hashlib (SHA-256), rfc8785 (JCS), pynacl
(ed25519, NaCl boxes), coincurve (secp256k1) and pycryptodome's keccak256, what a verifier in
another language would need. The second half feeds each vector to
``schemas.verify`` (and ``schemas.sealing``): it must be accepted, and rejected once one field
changes. Last, the generator must write the same bytes again.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import coincurve
import pytest
import rfc8785
from Crypto.Hash import keccak
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from schemas.admission import SignedAdmissionList, verify_admission_list
from schemas.base import VerificationMode
from schemas.inclusion import InclusionProof, check_inclusion_offline
from schemas.merkle import MerkleTree, envelope_leaf
from schemas.requests import ChatInput, InferenceRequest, input_hash
from schemas.results import (
    ErrorReply,
    InferenceResult,
    ResultEnvelope,
    SealedReply,
    SealedResult,
    StreamChunk,
)
from schemas.sealed import SealedInput
from schemas.sealing import BadPlaintext, Mismatch, NodeSealer, Opened, SealedRequest
from schemas.signing import Signer, envelope_digest
from schemas.verify.admission import Admissions, admission_problem
from schemas.verify.payer import envelope_grant, verify_payer
from schemas.verify.record import RecordRules, Rejected, Verified, verify_record
from schemas.verify.registry import RegistryView
from schemas.verify.result import Trust, verify_chunk, verify_error, verify_result

VECTOR_DIR = Path(__file__).parents[2] / "docs" / "vectors"
VECTOR_FILE = VECTOR_DIR / "results-v2.json"
V = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
KEYS = V["keys"]
RESULTS = V["results"]
DOMAINS = {
    "result": b"og-inference-node/result-envelope/v2",
    "error": b"og-inference-node/error-reply/v2",
    "chunk": b"og-inference-node/stream-chunk/v2",
    "payer": b"og-inference-node/payer-grant/v2",
    "registration": b"og-inference-node/node-registration/v2",
    "admission": b"og-inference-node/admission-list/v2",
}
SECP256K1_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


# -- first principles ------------------------------------------------------------------------


def jcs(value: Any) -> bytes:
    return rfc8785.dumps(value)


def sha256_hex(value: Any) -> str:
    return hashlib.sha256(jcs(value)).hexdigest()


def domain_digest(kind: str, value: Any) -> bytes:
    """sha256(domain || 0x00 || JCS(value))."""
    return hashlib.sha256(DOMAINS[kind] + b"\x00" + jcs(value)).digest()


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def eip191_hash(digest: bytes) -> bytes:
    return keccak256(b"\x19Ethereum Signed Message:\n32" + digest)


def address_of(public: coincurve.PublicKey) -> str:
    return "0x" + keccak256(public.format(compressed=False)[1:])[-20:].hex()


def eip191_sign(private_key_hex: str, digest: bytes) -> str:
    raw = coincurve.PrivateKey(bytes.fromhex(private_key_hex)).sign_recoverable(
        eip191_hash(digest), hasher=None
    )
    return "0x" + (raw[:64] + bytes([raw[64] + 27])).hex()


def eip191_recover(digest: bytes, signature: str) -> str:
    """As ``ecrecover`` (OpenZeppelin ``ECDSA.tryRecover``): 65 bytes r || s || v, v in {27, 28},
    s in the lower half of the curve order."""
    assert signature.startswith("0x")
    raw = bytes.fromhex(signature[2:])
    assert len(raw) == 65 and raw[64] in (27, 28)
    assert int.from_bytes(raw[32:64], "big") <= SECP256K1_HALF_ORDER
    public = coincurve.PublicKey.from_signature_and_message(
        raw[:64] + bytes([raw[64] - 27]), eip191_hash(digest), hasher=None
    )
    return address_of(public)


def ed25519_check(seed_hex: str, public_hex: str, digest: bytes, signature_hex: str) -> None:
    """The signature verifies under the public key, and signing again gives the same bytes."""
    VerifyKey(bytes.fromhex(public_hex)).verify(digest, bytes.fromhex(signature_hex))
    key = SigningKey(bytes.fromhex(seed_hex))
    assert key.verify_key.encode().hex() == public_hex
    assert key.sign(digest).signature.hex() == signature_hex


def without_signature(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "signature"}


def sealed_box(message: bytes, recipient: bytes, ephemeral_seed: bytes) -> bytes:
    """libsodium ``crypto_box_seal`` with a given ephemeral key."""
    ephemeral = PrivateKey(ephemeral_seed)
    epk = ephemeral.public_key.encode()
    nonce = hashlib.blake2b(epk + recipient, digest_size=24).digest()
    return epk + Box(ephemeral, PublicKey(recipient)).encrypt(message, nonce).ciphertext


def check_node_message(kind: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A signed error or chunk: canonical form and digest without ``signature``, and the node's
    signature over that digest; returns the message."""
    message = entry["message"]
    fields = without_signature(message)
    assert jcs(fields).decode() == entry["canonical_unsigned"]
    digest = domain_digest(kind, fields)
    assert digest.hex() == entry["digest_hex"]
    seed = KEYS["node"]["ed25519_seed_hex"]
    ed25519_check(seed, message["node_id"], digest, message["signature"])
    return message


def grant_of(envelope: dict[str, Any]) -> dict[str, Any]:
    """The payer grant, rebuilt from a signed envelope."""
    return {
        "request_id": envelope["request_id"],
        "model": envelope["model_id"],
        "input_hash": envelope["input_hash"],
        "max_output_tokens": envelope["max_output_tokens"],
        "created_unix_ms": envelope["request_created_unix_ms"],
        "settlement": envelope["settlement"],
    }


def check_payer(payer: dict[str, Any], grant: dict[str, Any]) -> None:
    digest = domain_digest("payer", grant)
    if payer["scheme"] == "ed25519":
        seed = KEYS["payer_ed25519"]["ed25519_seed_hex"]
        ed25519_check(seed, payer["key"], digest, payer["signature"])
    else:
        assert eip191_recover(digest, payer["signature"]) == payer["key"]
        private = KEYS["payer_eip191"]["secp256k1_private_key_hex"]
        assert eip191_sign(private, digest) == payer["signature"]


def check_envelope(envelope: dict[str, Any], signature: str, chain_signature: str) -> bytes:
    """Both node signatures over the envelope digest; returns the digest."""
    node = KEYS["node"]
    digest = domain_digest("result", envelope)
    ed25519_check(node["ed25519_seed_hex"], envelope["node_id"], digest, signature)
    assert eip191_recover(digest, chain_signature) == node["chain_address"]
    assert eip191_sign(node["secp256k1_private_key_hex"], digest) == chain_signature
    return digest


def test_domains_and_keys() -> None:
    assert {k: v.encode() for k, v in V["domains"].items()} == DOMAINS

    def ed25519(seed: str) -> str:
        return SigningKey(bytes.fromhex(seed)).verify_key.encode().hex()

    def x25519(seed: str) -> str:
        return PrivateKey(bytes.fromhex(seed)).public_key.encode().hex()

    def secp256k1(key: str) -> str:
        return address_of(coincurve.PrivateKey(bytes.fromhex(key)).public_key)

    node = KEYS["node"]
    assert ed25519(node["ed25519_seed_hex"]) == node["node_id"]
    assert x25519(node["x25519_seed_hex"]) == node["x25519_public_key"]
    assert secp256k1(node["secp256k1_private_key_hex"]) == node["chain_address"]
    assert ed25519(KEYS["payer_ed25519"]["ed25519_seed_hex"]) == KEYS["payer_ed25519"]["key"]
    payer = KEYS["payer_eip191"]
    assert secp256k1(payer["secp256k1_private_key_hex"]) == payer["key"]
    authority = KEYS["authority"]
    assert ed25519(authority["ed25519_seed_hex"]) == authority["authority_id"]
    reply = KEYS["client_reply"]
    assert x25519(reply["x25519_seed_hex"]) == reply["public_key"]


@pytest.mark.parametrize("v", RESULTS, ids=[v["name"] for v in RESULTS])
def test_result_from_first_principles(v: dict[str, Any]) -> None:
    request, result = v["request"], v["result"]
    envelope, payload, payer = result["envelope"], request["payload"], request["payer"]
    assert jcs(payload).decode() == v["canonical_payload"]
    assert sha256_hex(payload) == v["input_hash"] == envelope["input_hash"]
    budget = payload["params"]["max_tokens"] if payload["kind"] == "chat" else None
    assert envelope["max_output_tokens"] == budget
    for field, asked in (("model_id", "model"), ("request_created_unix_ms", "created_unix_ms")):
        assert envelope[field] == request[asked]
    for field in ("request_id", "mode", "settlement", "payer"):
        assert envelope[field] == request[field]
    assert payer == v["payer_grant"]["payer"]

    grant = grant_of(envelope)
    assert grant == v["payer_grant"]["grant"]
    assert jcs(grant).decode() == v["payer_grant"]["canonical_grant"]
    assert domain_digest("payer", grant).hex() == v["payer_grant"]["digest_hex"]
    check_payer(payer, grant)
    if payer["scheme"] == "eip191":
        eip191 = v["payer_grant"]["eip191"]
        assert eip191_hash(domain_digest("payer", grant)).hex() == eip191["eip191_message_hash_hex"]
        assert eip191["recovered_address"] == payer["key"]

    assert jcs(result["output"]).decode() == v["canonical_output"]
    assert sha256_hex(result["output"]) == v["output_hash"] == envelope["output_hash"]
    assert jcs(envelope).decode() == v["canonical_envelope"]
    assert result["request_id"] == envelope["request_id"]
    assert result["signature"] == v["signature"]
    assert result["chain_signature"] == v["chain_signature"]["signature"]
    digest = check_envelope(envelope, result["signature"], result["chain_signature"])
    assert digest.hex() == v["envelope_digest_hex"]
    assert eip191_hash(digest).hex() == v["chain_signature"]["eip191_message_hash_hex"]
    assert v["chain_signature"]["recovered_address"] == KEYS["node"]["chain_address"]


def test_error_from_first_principles() -> None:
    reply, request = check_node_message("error", V["error"]), V["error"]["request"]
    assert reply["request_id"] == request["request_id"]
    assert reply["input_hash"] == sha256_hex(request["payload"])


def test_chunks_from_first_principles() -> None:
    c = V["chunks"]
    chunks = [check_node_message("chunk", entry) for entry in c["chunks"]]
    assert {chunk["request_id"] for chunk in chunks} == {c["request_id"]}
    assert [chunk["index"] for chunk in chunks] == list(range(len(chunks)))
    text = "".join(chunk["text"] for chunk in chunks)
    [streamed] = [r for r in RESULTS if r["request"]["request_id"] == c["request_id"]]
    assert text == c["reassembled_text"] == streamed["result"]["output"]["text"]


def test_registration_from_first_principles() -> None:
    r = V["registration"]
    registration = r["record"]["registration"]
    assert jcs(registration).decode() == r["canonical_registration"]
    digest = domain_digest("registration", registration)
    assert digest.hex() == r["digest_hex"]
    node = KEYS["node"]
    ed25519_check(node["ed25519_seed_hex"], node["node_id"], digest, r["record"]["signature"])
    assert registration["x25519_public_key"] == node["x25519_public_key"]
    assert registration["chain_address"] == node["chain_address"]


def test_admission_list_from_first_principles() -> None:
    a = V["admission"]
    admission_list = a["signed"]["list"]
    assert jcs(admission_list).decode() == a["canonical_list"]
    digest = domain_digest("admission", admission_list)
    assert digest.hex() == a["digest_hex"]
    authority = KEYS["authority"]
    assert admission_list["authority_id"] == authority["authority_id"]
    ed25519_check(
        authority["ed25519_seed_hex"], authority["authority_id"], digest, a["signed"]["signature"]
    )
    # Admission: the node is listed with the chain address its results recover to.
    admitted = {n["node_id"]: n["chain_address"] for n in admission_list["nodes"]}
    assert admitted[KEYS["node"]["node_id"]] == KEYS["node"]["chain_address"]


def test_settlement_from_first_principles() -> None:
    s = V["settlement"]
    rules, received = s["rules"], s["received_unix_ms"]
    leaves = []
    for entry in s["records"]:
        record = entry["record"]
        env = record["envelope"]
        digest = check_envelope(env, record["signature"], record["chain_signature"])
        # The settlement rules, in order (docs/PROTOCOL.md).
        assert env["signed_unix_ms"] <= received + rules["max_clock_skew_s"] * 1000
        oldest = received - rules["max_record_age_s"] * 1000
        assert env["signed_unix_ms"] >= oldest and env["request_created_unix_ms"] >= oldest
        assert (
            env["request_created_unix_ms"]
            <= env["signed_unix_ms"] + rules["max_clock_skew_s"] * 1000
        )
        assert env["usage"]["output_tokens"] <= (env["max_output_tokens"] or 0)
        check_payer(env["payer"], grant_of(env))
        # Its Merkle leaf.
        values = [
            keccak256(env["request_id"].encode("utf-8")),
            bytes.fromhex(env["node_id"]),
            bytes.fromhex(env["input_hash"]),
            bytes.fromhex(env["output_hash"]),
            digest,
        ]
        assert ["0x" + x.hex() for x in values] == entry["leaf_values"]
        encoded = b"".join(values)  # abi.encode of five bytes32: their concatenation
        assert "0x" + encoded.hex() == entry["abi_encoded_hex"]
        leaf = keccak256(keccak256(encoded))
        assert "0x" + leaf.hex() == entry["leaf_hash"]
        leaves.append(leaf)
    low, high = sorted(leaves)  # two leaves: the root is their sorted pair's hash
    assert ["0x" + low.hex(), "0x" + high.hex()] == s["tree"]["sorted_leaves"]
    assert "0x" + keccak256(low + high).hex() == s["tree"]["root"]

    proof = s["inclusion_proof"]
    values = [bytes.fromhex(x[2:]) for x in proof["leaf"]["values"]]
    assert proof["leaf"]["types"] == ["bytes32"] * 5
    node = keccak256(keccak256(b"".join(values)))  # recomputed, never taken as given
    assert "0x" + node.hex() == proof["leaf_hash"]
    for sibling in proof["proof"]:
        a, b = sorted((node, bytes.fromhex(sibling[2:])))
        node = keccak256(a + b)
    assert "0x" + node.hex() == proof["root"] == s["tree"]["root"]
    assert proof["leaf"]["values"] == s["records"][0]["leaf_values"]


def test_sealed_from_first_principles() -> None:
    s = V["sealed"]
    fixed = s["fixed_randomness"]
    ephemeral = {k: bytes.fromhex(x) for k, x in fixed["ephemeral_x25519_seeds_hex"].items()}
    request, payload = s["request"], s["request"]["payload"]
    node = PrivateKey(bytes.fromhex(KEYS["node"]["x25519_seed_hex"]))
    reply_key = PrivateKey(bytes.fromhex(KEYS["client_reply"]["x25519_seed_hex"]))

    [recipient] = payload["recipients"]
    assert recipient["x25519_public_key"] == node.public_key.encode().hex()
    sealed_key = base64.b64decode(recipient["sealed_key"])
    content_key = SealedBox(node).decrypt(sealed_key)
    assert content_key.hex() == fixed["content_key_hex"] and len(sealed_key) == 80
    assert sealed_box(content_key, node.public_key.encode(), ephemeral["recipient"]) == sealed_key

    ciphertext = base64.b64decode(payload["ciphertext"])
    assert ciphertext[:24].hex() == fixed["secretbox_nonce_hex"]
    plaintext = SecretBox(content_key).decrypt(ciphertext)
    assert plaintext.decode() == s["canonical_sealed_plaintext"]
    inner = json.loads(plaintext)
    assert inner == s["sealed_plaintext"] and jcs(inner) == plaintext
    assert bytes(SecretBox(content_key).encrypt(plaintext, ciphertext[:24])) == ciphertext
    bound = ("mode", "settlement", "reply_to", "payer", "created_unix_ms", "deadline_unix_ms")
    for field in ("request_id", "model", *bound, "stream"):
        assert inner[field] == request[field], field
    assert inner["reply_public_key"] == payload["reply_public_key"]
    assert reply_key.public_key.encode().hex() == payload["reply_public_key"]
    assert inner["payload"] == s["plain_request"]["payload"]

    result = s["result"]
    env = result["envelope"]
    assert sha256_hex(inner["payload"]) == s["input_hash"] == env["input_hash"]
    assert grant_of(env) == s["payer_grant"]["grant"]
    check_payer(inner["payer"], grant_of(env))
    digest = check_envelope(env, result["signature"], result["chain_signature"])
    assert digest.hex() == s["envelope_digest_hex"]

    sealed_output = base64.b64decode(result["sealed_output"])
    assert SealedBox(reply_key).decrypt(sealed_output) == jcs(s["output"])
    assert sealed_box(jcs(s["output"]), reply_key.public_key.encode(), ephemeral["output"]) == (
        sealed_output
    )
    assert sha256_hex(s["output"]) == s["output_hash"] == env["output_hash"]

    sealed_reply = base64.b64decode(s["reply"]["sealed"])
    chunk = check_node_message("chunk", s["chunk"])
    assert SealedBox(reply_key).decrypt(sealed_reply) == jcs(chunk)
    assert sealed_box(jcs(chunk), reply_key.public_key.encode(), ephemeral["chunk"]) == sealed_reply
    assert chunk["request_id"] == s["reply"]["request_id"]
    assert chunk["node_id"] == s["reply"]["node_id"]
    assert s["record"]["envelope"] == env and env["settlement"] == "private"


# -- our code accepts the vectors, and rejects a one-field change -----------------------------


def _trust() -> Trust:
    signed = SignedAdmissionList.model_validate(V["admission"]["signed"])
    at = V["settlement"]["received_unix_ms"]
    return Trust(Admissions.from_list(signed.list, at), at)


def _registry() -> RegistryView:
    view = RegistryView(admissions=_trust().admissions)
    r = V["registration"]
    assert view.apply(json.dumps(r["record"]).encode(), r["received_unix_ms"]) is None
    return view


def _changed(message: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``message`` with the field at dotted ``path`` set to ``value``."""
    out = copy.deepcopy(message)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    assert node[last] != value
    node[last] = value
    return out


@pytest.mark.parametrize("v", RESULTS, ids=[v["name"] for v in RESULTS])
def test_result_accepted_by_our_code(v: dict[str, Any]) -> None:
    result = InferenceResult.model_validate(v["result"])
    request = InferenceRequest.model_validate(v["request"])
    report = verify_result(result, request, trust=_trust())
    assert report.ok, report.failed()
    assert envelope_digest(result.envelope).hex() == v["envelope_digest_hex"]
    assert result.envelope.payer is not None
    assert verify_payer(result.envelope.payer, envelope_grant(result.envelope))
    assert not verify_result(result, request).ok  # no trust given: nobody is admitted


@pytest.mark.parametrize("v", RESULTS, ids=[v["name"] for v in RESULTS])
def test_result_with_one_field_changed_is_rejected(v: dict[str, Any]) -> None:
    request = InferenceRequest.model_validate(v["request"])
    changed = _changed(v["result"], "envelope.usage.input_tokens", 1000)
    report = verify_result(InferenceResult.model_validate(changed), request, trust=_trust())
    assert report.failed() == ["signature", "chain_signature"]
    other = _changed(v["request"], "created_unix_ms", v["request"]["created_unix_ms"] + 1)
    report = verify_result(
        InferenceResult.model_validate(v["result"]),
        InferenceRequest.model_validate(other),
        trust=_trust(),
    )
    assert report.failed() == ["request_terms"]


def test_error_accepted_and_one_field_change_rejected() -> None:
    e = V["error"]
    request = InferenceRequest.model_validate(e["request"])
    report = verify_error(ErrorReply.model_validate(e["message"]), request, trust=_trust())
    assert report.ok, report.failed()
    changed = ErrorReply.model_validate(_changed(e["message"], "code", "internal"))
    assert verify_error(changed, request, trust=_trust()).failed() == ["signature"]


def test_chunks_accepted_and_one_field_change_rejected() -> None:
    c = V["chunks"]
    for entry in c["chunks"]:
        chunk = StreamChunk.model_validate(entry["message"])
        assert verify_chunk(chunk, c["request_id"], trust=_trust()).ok
    changed = StreamChunk.model_validate(_changed(c["chunks"][0]["message"], "index", 5))
    assert verify_chunk(changed, c["request_id"], trust=_trust()).failed() == ["signature"]


def test_registration_accepted_and_replays_ignored() -> None:
    r, view, vanilla = V["registration"], _registry(), VerificationMode.VANILLA
    node, received = KEYS["node"]["node_id"], V["settlement"]["received_unix_ms"]
    for model in r["record"]["registration"]["models"]:
        assert view.check(node, model["name"], model["digest"], vanilla, received) is None
    raw = json.dumps(r["record"]).encode()
    assert view.apply(raw, r["received_unix_ms"]) == "out_of_order"  # a replay changes nothing
    assert view.apply(None, r["received_unix_ms"]) == "tombstone"
    changed = _changed(r["record"], "registration.sequence", 2**53 - 1)
    assert view.apply(json.dumps(changed).encode(), r["received_unix_ms"]) == "bad_signature"
    # Stale: three heartbeat intervals after the heartbeat as received.
    late = r["received_unix_ms"] + 30_001
    assert view.check(node, "demo-lm", "ab" * 32, vanilla, late) == "stale_node"


def test_admission_list_accepted_and_one_field_change_rejected() -> None:
    signed = V["admission"]["signed"]
    assert verify_admission_list(SignedAdmissionList.model_validate(signed))
    admissions = _trust().admissions
    node = KEYS["node"]
    assert admission_problem(admissions, node["node_id"], node["chain_address"], None) is None
    other_address = "0x" + "00" * 20
    problem = admission_problem(admissions, node["node_id"], other_address, None)
    assert problem == "chain_address_mismatch"
    stranger = KEYS["authority"]["authority_id"]
    assert admission_problem(admissions, stranger, node["chain_address"], None) == "not_admitted"
    approved = ("tdx", signed["list"]["measurements"][0]["measurement"])
    assert admission_problem(admissions, stranger, node["chain_address"], approved) is None
    changed = _changed(signed, "list.sequence", signed["list"]["sequence"] + 1)
    assert not verify_admission_list(SignedAdmissionList.model_validate(changed))


def _verify_record(record: dict[str, Any], received: int | None = None) -> Verified | Rejected:
    s = V["settlement"]
    return verify_record(
        json.dumps(record).encode(),
        received_unix_ms=s["received_unix_ms"] if received is None else received,
        rules=RecordRules(**s["rules"]),
        nodes=_registry(),
    )


def _resigned(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``record`` with one envelope field changed and signed again by the node's ed25519 key:
    it then fails on a later rule than the signature."""
    changed = _changed(record, path, value)
    signer = Signer(bytes.fromhex(KEYS["node"]["ed25519_seed_hex"]))
    changed["signature"] = signer.sign_envelope(ResultEnvelope.model_validate(changed["envelope"]))
    return changed


def test_settlement_record_accepted_by_our_code() -> None:
    s = V["settlement"]
    leaves = []
    for entry, result in zip(s["records"], RESULTS, strict=True):
        outcome = _verify_record(entry["record"])
        assert isinstance(outcome, Verified), outcome
        assert outcome.digest.hex() == result["envelope_digest_hex"]
        leaf = envelope_leaf(outcome.record.envelope)
        assert "0x" + leaf.hex() == entry["leaf_hash"]
        leaves.append(leaf)
    assert "0x" + MerkleTree(leaves).root.hex() == s["tree"]["root"]
    proof = InclusionProof.model_validate(s["inclusion_proof"])
    signed = InferenceResult.model_validate(RESULTS[0]["result"])
    assert all(c.ok for c in check_inclusion_offline(proof, signed))
    assert isinstance(_verify_record(V["sealed"]["record"]), Verified)


def test_settlement_record_with_one_field_changed_is_rejected() -> None:
    s = V["settlement"]
    record = s["records"][0]["record"]
    env = record["envelope"]
    max_age_ms = s["rules"]["max_record_age_s"] * 1000
    skew_ms = s["rules"]["max_clock_skew_s"] * 1000
    cases = [
        (_changed(record, "envelope.usage.output_tokens", 10), None, "bad_signature"),
        (record, env["signed_unix_ms"] - skew_ms - 1, "future_timestamp"),
        (record, env["request_created_unix_ms"] + max_age_ms + 1, "too_old"),
        (_resigned(record, "envelope.usage.output_tokens", 17), None, "over_budget"),
        (_resigned(record, "envelope.max_output_tokens", 17), None, "bad_payer"),
        (_resigned(record, "envelope.model_digest", "ef" * 32), None, "unregistered_model"),
    ]
    later = _resigned(record, "envelope.signed_unix_ms", env["signed_unix_ms"] + 1)
    cases.append((later, None, "bad_chain_signature"))  # the chain key did not sign this
    for changed, received, reason in cases:
        outcome = _verify_record(changed, received)
        assert getattr(outcome, "reason", None) == reason, (reason, outcome)
    proof = _changed(s["inclusion_proof"], "leaf.values", s["records"][1]["leaf_values"])
    checks = check_inclusion_offline(InclusionProof.model_validate(proof))
    assert [c.name for c in checks if not c.ok] == ["leaf_hash", "merkle_path"]


def test_sealed_accepted_by_our_code_and_mismatch_refused() -> None:
    s = V["sealed"]
    request = InferenceRequest.model_validate(s["request"])
    payload = request.payload
    assert isinstance(payload, SealedInput)
    sealer = NodeSealer(bytes.fromhex(KEYS["node"]["x25519_seed_hex"]))
    opened = sealer.open(request, payload)
    assert isinstance(opened, Opened)
    assert opened.document == s["plain_request"]["payload"]

    plaintext = ChatInput.model_validate(s["plain_request"]["payload"])
    reply_key = PrivateKey(bytes.fromhex(KEYS["client_reply"]["x25519_seed_hex"]))
    client = SealedRequest(request, plaintext, reply_key)
    result = client.open(SealedResult.model_validate(s["result"]))
    report = verify_result(result, request, trust=_trust(), plaintext=plaintext)
    assert report.ok, report.failed()
    chunk = client.open_reply(SealedReply.model_validate(s["reply"]))
    assert isinstance(chunk, StreamChunk)
    assert verify_chunk(chunk, request.request_id, trust=_trust()).ok

    # Any clear field the plaintext binds, changed after sealing: refused as a mismatch.
    other_key = KEYS["node"]["x25519_public_key"]
    changes = {"reply_to": "og.replies.other", "settlement": "batch", "stream": False}
    changes |= {"deadline_unix_ms": None, "payload.reply_public_key": other_key}
    for field, value in changes.items():
        changed = InferenceRequest.model_validate(_changed(s["request"], field, value))
        assert isinstance(changed.payload, SealedInput)
        assert isinstance(sealer.open(changed, changed.payload), Mismatch), field
    other_id = InferenceRequest.model_validate(_changed(s["request"], "request_id", "other"))
    assert isinstance(sealer.open(other_id, payload), BadPlaintext)


def test_input_hash_is_over_the_payload_as_sent() -> None:
    """A producer omitting optional fields must be able to recompute input_hash."""
    sent = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}
    parsed = InferenceRequest.model_validate(
        {"request_id": "r", "model": "demo-lm", "created_unix_ms": 0, "payload": sent}
    ).payload
    assert input_hash(sent) == sha256_hex(sent)
    assert input_hash(parsed) != input_hash(sent)  # defaults change the canonical form


def test_generator_writes_the_same_bytes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("vectors_generate", VECTOR_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = generator.main(tmp_path)
    assert written.read_bytes() == VECTOR_FILE.read_bytes()
