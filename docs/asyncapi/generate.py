"""Generate ``docs/asyncapi.yaml`` (AsyncAPI 3.0) from our topic names and wire models.

    python docs/asyncapi/generate.py            # rewrite docs/asyncapi.yaml
    python docs/asyncapi/generate.py --check    # exit 1 when the committed file is stale

Why our own generator: the node does not use faststream (its intake keeps a window of
in-flight requests per partition with ordered commits), so there is no framework document to
export. The contract already lives in ``schemas/``: topic names and headers in
``schemas.topics``, messages as pydantic models. This script turns exactly that into AsyncAPI,
and ``tests/unit/test_asyncapi.py`` fails when the committed document drifts from the code.

Extension point: each channel names the ``schemas`` modules its messages come from. A module
that does not exist (yet) is skipped; in one that does, every public (``__all__``) model with a
``schema_version`` field and a ``type`` literal is a message of that channel. So
``schemas/proofs.py`` (ZKML proofs on the settlement topic) and new messages in
``schemas/registry.py`` appear here on the next regeneration without touching this file.

Payload schemas are pydantic's JSON Schemas (those of ``schemas.jsonschema.all_schemas()`` and
of each message model), with their ``$defs`` moved to ``components/schemas`` and pydantic's
OpenAPI-style ``discriminator`` objects kept as ``x-discriminator`` (AsyncAPI's own
``discriminator`` is a property name with inheritance semantics, which is not what ours mean).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from schemas import topics as t
from schemas.jsonschema import all_schemas
from schemas.topics import standard_topics
from schemas.version import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "docs" / "asyncapi.yaml"
KAFKA_BINDING = "0.5.0"

_TRACEPARENT = {
    "type": "string",
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$",
    "description": "W3C trace context. Requests may carry one; every message a worker publishes "
    "for a request carries one naming the worker's span (a new trace when the request had none).",
}
_SCHEMA_VERSION_HEADER = {
    "type": "string",
    "const": str(SCHEMA_VERSION),
    "description": "Wire schema version of the payload.",
}
_DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
_HEX32 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


@dataclass(frozen=True)
class Channel:
    """One topic (family) and where its messages and Kafka details come from."""

    id: str
    address: str
    title: str
    description: str
    modules: tuple[str, ...]
    key: dict[str, Any]
    headers: str
    parameters: dict[str, Any] = field(default_factory=dict)
    topic_spec: str | None = None
    """Which ``infra.kafka.admin.standard_topics`` entry gives partitions and configs."""
    extra_messages: tuple[str, ...] = ()


CHANNELS = (
    Channel(
        id="inferenceRequests",
        address="{namespace}.infer.{model}",
        title="Inference requests",
        description="One topic per model. Workers serving the model consume it in a shared "
        "consumer group with manual, ordered commits (at-least-once).",
        modules=("schemas.requests",),
        key={
            "type": "string",
            "description": "The request id (or a session id when the "
            "order of a client's requests matters).",
        },
        headers="RequestHeaders",
        parameters={
            "model": {
                "description": "Model name (" + t.MODEL_NAME_PATTERN + ").",
                "examples": ["demo-mlp", "demo-lm"],
            }
        },
        topic_spec="infer",
    ),
    Channel(
        id="replies",
        address="{replyTopic}",
        title="Replies",
        description="The request's reply_to topic, or {namespace}.replies when it names none "
        "(or names an internal topic). Stream chunks, then exactly one terminal reply (a "
        "result, sealed result or typed error); after a crash the same reply may arrive again "
        "with the same request id.",
        modules=("schemas.results",),
        key={
            "type": "string",
            "description": "The request id: a request's chunks and reply "
            "share one partition, in order.",
        },
        headers="AnswerHeaders",
        parameters={
            "replyTopic": {
                "description": "reply_to of the request; default {namespace}.replies.",
                "examples": ["og.replies", "client-7.replies"],
            }
        },
        topic_spec="replies",
    ),
    Channel(
        id="settlement",
        address="{namespace}.settlement",
        title="Settlement records",
        description="Hashes and signatures of every result (never the prompt or output), and "
        "ZKML proofs that follow them. Consumed by the settlement service.",
        modules=("schemas.settlement", "schemas.proofs"),
        key={
            "type": "string",
            "description": "The request id: a request's records share a partition, one "
            "node's records spread over all of them.",
        },
        headers="AnswerHeaders",
        topic_spec="settlement",
    ),
    Channel(
        id="deadLetters",
        address="{namespace}.dlq",
        title="Dead letters",
        description="Messages that could not be answered (no request id to answer to). The "
        "original bytes are sealed to the operator's DLQ key; `inference-node dlq replay` "
        "opens and re-produces them.",
        modules=(),
        key={"type": "null", "description": "No key."},
        headers="DeadLetterHeaders",
        topic_spec="dlq",
        extra_messages=("DeadLetterEntry",),
    ),
    Channel(
        id="registry",
        address="{namespace}.registry",
        title="Node registry",
        description="Compacted: the latest signed registration (with heartbeat and sequence "
        "number) of each node. Anyone may write here: a registration is a claim, trusted only "
        "for a node the admission source (NodeRegistry contract or pinned authority list) "
        "admits, and only when it is fresh by the reader's own clock (PROTOCOL.md).",
        modules=("schemas.registry",),
        key={"type": "string", "description": "The node id."},
        headers="RegistryHeaders",
        topic_spec="registry",
    ),
    Channel(
        id="publishedBatches",
        address="{namespace}.batches",
        title="Published batches",
        description="Compacted, never expired: the leaves of each batch settlement anchored. "
        "The message bytes are the RFC 8785 document whose sha256 is the batch's batchRef on "
        "chain; anyone can rebuild the tree and prove a result's inclusion from it.",
        modules=("schemas.batches",),
        key={"type": "string", "description": "The batch index on chain, in decimal."},
        headers="RegistryHeaders",
        topic_spec="batches",
    ),
)

HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "RequestHeaders": {
        "type": "object",
        "properties": {
            t.HEADER_SCHEMA_VERSION: _SCHEMA_VERSION_HEADER,
            t.HEADER_TRACEPARENT: _TRACEPARENT,
            t.HEADER_ATTEMPTS: {
                **_DIGITS,
                "description": "Earlier attempts; set by a DLQ replay.",
            },
        },
    },
    "AnswerHeaders": {
        "type": "object",
        "required": [t.HEADER_SCHEMA_VERSION, t.HEADER_TRACEPARENT],
        "properties": {
            t.HEADER_SCHEMA_VERSION: _SCHEMA_VERSION_HEADER,
            t.HEADER_TRACEPARENT: _TRACEPARENT,
        },
    },
    "DeadLetterHeaders": {
        "type": "object",
        "required": [
            t.HEADER_SCHEMA_VERSION,
            t.HEADER_REASON,
            t.HEADER_ORIGINAL_TOPIC,
            t.HEADER_ORIGINAL_PARTITION,
            t.HEADER_ORIGINAL_OFFSET,
            t.HEADER_ATTEMPTS,
        ],
        "properties": {
            t.HEADER_SCHEMA_VERSION: _SCHEMA_VERSION_HEADER,
            t.HEADER_REASON: {"type": "string", "maxLength": 512},
            t.HEADER_ORIGINAL_TOPIC: {"type": "string"},
            t.HEADER_ORIGINAL_PARTITION: _DIGITS,
            t.HEADER_ORIGINAL_OFFSET: _DIGITS,
            t.HEADER_ATTEMPTS: _DIGITS,
            t.HEADER_TRACEPARENT: _TRACEPARENT,
        },
    },
    "RegistryHeaders": {
        "type": "object",
        "properties": {t.HEADER_SCHEMA_VERSION: _SCHEMA_VERSION_HEADER},
    },
}

DEAD_LETTER_ENTRY: dict[str, Any] = {
    "title": "DeadLetterEntry",
    "description": "Written by worker.publish.Publisher.dead_letter. The payload is sealed "
    "(X25519 sealed box) to the operator's DLQ key: the DLQ never holds user data in clear.",
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema_version",
        "type",
        "reason",
        "original_topic",
        "original_partition",
        "original_offset",
        "attempts",
        "size_bytes",
        "sha256",
        "sealed_payload_hex",
        "dead_lettered_unix_ms",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "type": {"const": "dlq_entry"},
        "reason": {"type": "string"},
        "original_topic": {"type": "string"},
        "original_partition": {"type": "integer", "minimum": 0},
        "original_offset": {"type": "integer", "minimum": 0},
        "attempts": {"type": "integer", "minimum": 1},
        "size_bytes": {"type": "integer", "minimum": 0},
        "sha256": {**_HEX32, "description": "sha256 of the original bytes."},
        "sealed_payload_hex": {
            "oneOf": [{"type": "string", "pattern": "^([0-9a-f]{2})*$"}, {"type": "null"}],
            "description": "null when the original exceeds 400,000 bytes (see PROTOCOL.md)",
        },
        "dead_lettered_unix_ms": {"type": "integer", "minimum": 0},
    },
}


# -- schemas --------------------------------------------------------------------------------


def _rewrite(node: Any) -> Any:
    """Point ``#/$defs/X`` references at ``#/components/schemas/X``; keep discriminators."""
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, str) and value.startswith("#/$defs/"):
            out[key] = "#/components/schemas/" + value.removeprefix("#/$defs/")
        elif key == "discriminator" and isinstance(value, dict):
            out["x-discriminator"] = _rewrite(value)
        elif key in ("properties", "patternProperties", "$defs") and isinstance(value, dict):
            out[key] = {name: _rewrite(sub) for name, sub in value.items()}
        else:
            out[key] = _rewrite(value)
    return out


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    schema = copy.deepcopy(schema)
    for sub_name, sub in schema.pop("$defs", {}).items():
        _put(schemas, sub_name, _rewrite(sub))
    _put(schemas, name, _rewrite(schema))


def _put(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if name in schemas and schemas[name] != schema:
        raise ValueError(f"two different JSON Schemas are both named {name!r}")
    schemas[name] = schema


def wire_messages(module_name: str) -> list[type[BaseModel]]:
    """The top-level messages of a ``schemas`` module ([] when the module does not exist)."""
    if importlib.util.find_spec(module_name) is None:
        return []
    module = importlib.import_module(module_name)
    found = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseModel)
            and {"schema_version", "type"} <= set(obj.model_fields)
        ):
            found.append(obj)
    return found


def _summary(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else model.__name__


# -- document -------------------------------------------------------------------------------


def _topic_binding(channel: Channel) -> dict[str, Any]:
    binding: dict[str, Any] = {"bindingVersion": KAFKA_BINDING}
    if channel.topic_spec is None:
        return binding
    specs = {
        "infer": standard_topics("og", ["m"])[0],
        **{spec.name.split(".", 1)[1]: spec for spec in standard_topics("og", [])},
    }
    spec = specs[channel.topic_spec]
    binding["partitions"] = spec.partitions
    if "cleanup.policy" in spec.config:
        binding["topicConfiguration"] = {"cleanup.policy": spec.config["cleanup.policy"].split(",")}
    return binding


def build_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for name, schema in all_schemas().items():
        _add_schema(schemas, name, schema)
    schemas.update(HEADER_SCHEMAS)
    _put(schemas, "DeadLetterEntry", DEAD_LETTER_ENTRY)

    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    by_channel: dict[str, list[str]] = {}
    for channel in CHANNELS:
        names: list[str] = []
        for module in channel.modules:
            for model in wire_messages(module):
                _add_schema(schemas, model.__name__, model.model_json_schema())
                names.append(model.__name__)
        names += channel.extra_messages
        by_channel[channel.id] = names
        for name in names:
            message: dict[str, Any] = {
                "name": name,
                "title": name,
                "contentType": "application/json",
                "headers": {"$ref": f"#/components/schemas/{channel.headers}"},
                "payload": {"$ref": f"#/components/schemas/{name}"},
                "bindings": {"kafka": {"key": channel.key, "bindingVersion": KAFKA_BINDING}},
            }
            model_cls = next(
                (m for mod in channel.modules for m in wire_messages(mod) if m.__name__ == name),
                None,
            )
            if model_cls is not None:
                message["summary"] = _summary(model_cls)
                if "request_id" in model_cls.model_fields:
                    message["correlationId"] = {"location": "$message.payload#/request_id"}
            else:
                message["summary"] = schemas[name]["description"]
            messages[name] = message
        parameters = {
            "namespace": {
                "default": t.DEFAULT_NAMESPACE,
                "description": "Topic namespace (settings: namespace).",
            }
        }
        parameters.update(channel.parameters)
        used = {p for p in parameters if "{" + p + "}" in channel.address}
        channels[channel.id] = {
            "address": channel.address,
            "title": channel.title,
            "description": channel.description,
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
            **({"parameters": {p: parameters[p] for p in parameters if p in used}} if used else {}),
            "bindings": {"kafka": _topic_binding(channel)},
        }

    def refs(channel_id: str) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel_id}/messages/{n}"} for n in by_channel[channel_id]]

    def group(name: str) -> dict[str, Any]:
        return {
            "kafka": {
                "groupId": {"type": "string", "default": name},
                "bindingVersion": KAFKA_BINDING,
            }
        }

    operations = {
        "receiveInferenceRequest": {
            "action": "receive",
            "title": "Worker: answer a request",
            "summary": "Consume a request; publish its reply to the reply topic and, on "
            "success, a settlement record; dead-letter what has no request id.",
            "channel": {"$ref": "#/channels/inferenceRequests"},
            "messages": refs("inferenceRequests"),
            "bindings": group("og-workers"),
            "reply": {
                "address": {
                    "location": "$message.payload#/reply_to",
                    "description": "reply_to of the request; {namespace}.replies when unset.",
                },
                "channel": {"$ref": "#/channels/replies"},
                "messages": refs("replies"),
            },
        },
        "sendSettlementRecord": {
            "action": "send",
            "title": "Worker: publish settlement records (and proofs)",
            "channel": {"$ref": "#/channels/settlement"},
            "messages": refs("settlement"),
        },
        "sendDeadLetter": {
            "action": "send",
            "title": "Worker: dead-letter an unanswerable message",
            "channel": {"$ref": "#/channels/deadLetters"},
            "messages": refs("deadLetters"),
        },
        "receiveSettlementRecord": {
            "action": "receive",
            "title": "Settlement service: verify, store, batch and anchor",
            "channel": {"$ref": "#/channels/settlement"},
            "messages": refs("settlement"),
            "bindings": group("og-settlement"),
        },
    }
    if by_channel["publishedBatches"]:
        operations["sendPublishedBatch"] = {
            "action": "send",
            "title": "Settlement service: publish each anchored batch's leaves",
            "channel": {"$ref": "#/channels/publishedBatches"},
            "messages": refs("publishedBatches"),
        }
    if by_channel["registry"]:
        operations["sendRegistration"] = {
            "action": "send",
            "title": "Worker: publish its registration and heartbeats",
            "channel": {"$ref": "#/channels/registry"},
            "messages": refs("registry"),
        }

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Verifiable inference node",
            "version": importlib.metadata.version("verifiable-inference-node"),
            "description": "Kafka topics and messages of the verifiable inference node: "
            "requests in, signed replies and settlement records out. Generated by "
            "docs/asyncapi/generate.py from schemas/; do not edit by hand. Byte-level hashing "
            "and signing rules: docs/PROTOCOL.md.",
            "license": {"name": "Apache-2.0"},
            "x-og-schema-version": SCHEMA_VERSION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "cluster": {
                "host": "kafka:9092",
                "protocol": "kafka",
                "description": "Any Kafka-API cluster (Apache Kafka 3.x/4.x in production; "
                "settings: kafka.bootstrap_servers).",
                "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING}},
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "messages": dict(sorted(messages.items())),
        },
    }


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    """Plain YAML for readers: no anchors/aliases, multi-line text as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Literal blocks only where they keep the exact text (no trailing blanks on a line).
    literal = "\n" in value and not any(line != line.rstrip() for line in value.split("\n"))
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if literal else None)


_Dumper.add_representer(str, _str)


def render(document: dict[str, Any]) -> str:
    header = "# Generated by docs/asyncapi/generate.py from schemas/. Do not edit by hand.\n"
    body = str(yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100))
    return header + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render(build_document())
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            sys.stderr.write(f"{OUTPUT} is stale: run python docs/asyncapi/generate.py\n")
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
