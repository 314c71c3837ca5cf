"""docs/asyncapi.yaml: current with the code, valid AsyncAPI 3.0, and its payload schemas accept
real messages built by our own models (and refuse broken ones).

The AsyncAPI 3.0.0 JSON Schema comes from the npm package ``@asyncapi/specs`` (a dev dependency
in infra/node/package.json, installed by ``make install``), read offline.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7, DRAFT202012

from client.requests import build_request
from schemas import ChatInput, ChatMessage, ErrorCode, ErrorReply, SettlementRecord
from schemas.results import StreamChunk
from tests.harness.pipeline import CHAIN_SIGNER, SIGNER
from worker.answers import Answers

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
SPEC_PATH = ROOT / "infra/node/node_modules/@asyncapi/specs/schemas/3.0.0.json"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "asyncapi_generate", ROOT / "docs" / "asyncapi" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOC_PATH.read_text())
    return loaded


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.Draft7Validator:
    assert SPEC_PATH.exists(), "run `npm ci --prefix infra/node` (make install)"
    spec = json.loads(SPEC_PATH.read_text())
    registry: Registry[Any] = Registry()
    for uri, sub in spec["definitions"].items():
        registry = registry.with_resource(uri, Resource.from_contents(sub, DRAFT7))
    return jsonschema.Draft7Validator(spec, registry=registry)


def test_committed_document_is_current() -> None:
    generate = _generator()
    fresh = generate.render(generate.build_document())
    assert DOC_PATH.read_text() == fresh, (
        "docs/asyncapi.yaml is stale: run `python docs/asyncapi/generate.py`"
    )
    assert generate.main(["--check"]) == 0


def test_valid_asyncapi_3(
    doc: dict[str, Any], asyncapi_validator: jsonschema.Draft7Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in asyncapi_validator.iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["operations"]["receiveInferenceRequest"].update(action="publish"),
        lambda d: d["channels"]["settlement"].update(address=5),
        lambda d: d["components"]["messages"]["InferenceRequest"]["bindings"]["kafka"].update(
            bindingVersion="9.9.9"
        ),
        lambda d: d.update(asyncapi="2.6.0"),
    ],
)
def test_the_validator_does_refuse_broken_documents(
    doc: dict[str, Any], asyncapi_validator: jsonschema.Draft7Validator, breakage: Any
) -> None:
    broken = copy.deepcopy(doc)
    breakage(broken)
    assert not asyncapi_validator.is_valid(broken)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" or (isinstance(value, str) and value.startswith("#/")):
                    refs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    assert len(refs) > 50
    for ref in refs:
        assert ref.startswith("#/"), ref
        _resolve(doc, ref)  # KeyError names the dangling reference


def test_channels_topics_headers_and_bindings(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    assert channels["inferenceRequests"]["address"] == "{namespace}.infer.{model}"
    assert channels["settlement"]["address"] == "{namespace}.settlement"
    assert channels["deadLetters"]["address"] == "{namespace}.dlq"
    assert channels["registry"]["address"] == "{namespace}.registry"
    assert channels["registry"]["bindings"]["kafka"]["topicConfiguration"] == {
        "cleanup.policy": ["compact"]
    }
    replies = set(channels["replies"]["messages"])
    assert {"InferenceResult", "ErrorReply", "StreamChunk"} <= replies
    assert set(channels["settlement"]["messages"]) >= {"SettlementRecord"}
    assert "InferenceRequest" in channels["inferenceRequests"]["messages"]
    reply = doc["operations"]["receiveInferenceRequest"]["reply"]
    assert reply["address"]["location"] == "$message.payload#/reply_to"
    dlq_headers = doc["components"]["schemas"]["DeadLetterHeaders"]["properties"]
    assert {"og-reason", "og-original-topic", "og-original-offset", "og-attempts"} <= set(
        dlq_headers
    )
    for name, message in doc["components"]["messages"].items():
        assert message["bindings"]["kafka"]["key"], name
        assert message["payload"]["$ref"] == f"#/components/schemas/{name}"


def _payload_validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    # pydantic's schemas are draft 2020-12; the wrapper makes "#/components/..." resolve.
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(
        schema, registry=Registry().with_resource("urn:og", Resource(schema, DRAFT202012))
    )


def _json(model: Any) -> Any:
    return json.loads(model.model_dump_json())


def test_payload_schemas_accept_real_messages(doc: dict[str, Any]) -> None:
    request = build_request(
        "demo-lm", ChatInput(messages=[ChatMessage(role="user", content="hello")])
    )
    assert _payload_validator(doc, "InferenceRequest").is_valid(_json(request))
    answers = Answers(SIGNER, CHAIN_SIGNER, lambda: 1)
    error = answers.error(request.request_id, "demo-lm", ErrorCode.UNKNOWN_MODEL, "nope")
    assert isinstance(error, ErrorReply)
    assert _payload_validator(doc, "ErrorReply").is_valid(_json(error))
    chunk = answers.chunk(request.request_id, 0, "he", [])
    assert isinstance(chunk, StreamChunk)
    assert _payload_validator(doc, "StreamChunk").is_valid(_json(chunk))
    reply_union = _payload_validator(doc, "Reply")
    assert reply_union.is_valid(_json(error)) and reply_union.is_valid(_json(chunk))

    bad = _json(request)
    bad["payload"]["kind"] = "telepathy"
    assert not _payload_validator(doc, "InferenceRequest").is_valid(bad)
    record = {"schema_version": 2, "type": "settlement_record", "signature": "00"}
    assert not _payload_validator(doc, "SettlementRecord").is_valid(record)
    assert SettlementRecord.__name__ in doc["components"]["schemas"]
