"""Model references: what a hub index says about each model it serves.

A ``ModelRef`` names one immutable artifact (a single file, addressed by its sha256 digest) and
how to load it. The digest is what a worker signs as ``model_digest``, so it is checked every
time an artifact is materialised, never trusted from a cache.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator

from schemas.requests import Payload

__all__ = ["HubIndex", "ModelFormat", "ModelRef"]

_PAYLOAD_ADAPTER: TypeAdapter[Any] = TypeAdapter(Payload)


class ModelFormat(StrEnum):
    """How an artifact is packed and which engine runs it."""

    ONNX = "onnx"
    """A single ``.onnx`` file, run by ONNX Runtime."""
    HF_CAUSAL_LM = "hf-causal-lm"
    """A tar of a ``save_pretrained`` directory (model + tokenizer), run by transformers."""
    VLLM = "vllm"
    """Packed like ``hf-causal-lm``, served by vLLM on a GPU (the ``gpu`` extra). A separate
    format, not an engine choice: the output of a request depends on the runtime, so the hub
    entry names the one a verifier must use to reproduce it."""
    FIXED_LATENCY = "fixed-latency"
    """A JSON file ``{"latency_ms": N}``: echoes its ML input after N ms. For benchmarks and
    intake tests, where the engine's cost must be known exactly."""


class ModelRef(BaseModel):
    """One model version in a hub."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    format: ModelFormat
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    """Hex sha256 of the artifact file (the blob at ``uri``)."""
    size_bytes: int = Field(ge=0)
    uri: Annotated[str, StringConstraints(min_length=1)]
    """Location of the blob relative to the hub root, e.g. ``blobs/demo-mlp-1.onnx``."""
    example_input: dict[str, Any]
    """A request payload (``ChatInput`` or ``MLInput`` as JSON) the model accepts."""
    description: str = ""

    @field_validator("example_input")
    @classmethod
    def _payload_parses(cls, value: dict[str, Any]) -> dict[str, Any]:
        _PAYLOAD_ADAPTER.validate_python(value)
        return value

    @field_validator("uri")
    @classmethod
    def _relative_uri(cls, value: str) -> str:
        parts = value.replace("\\", "/").split("/")
        if value.startswith("/") or ".." in parts:
            raise ValueError("uri must be a path relative to the hub root, without '..'")
        return value


class HubIndex(BaseModel):
    """The list of models a hub serves (``index.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[ModelRef]

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value: list[ModelRef]) -> list[ModelRef]:
        names = [ref.name for ref in value]
        if len(names) != len(set(names)):
            raise ValueError("model names in a hub index must be unique")
        return value

    def get(self, name: str) -> ModelRef:
        """Return the model called ``name``; ``KeyError`` if the hub does not serve it."""
        for ref in self.models:
            if ref.name == name:
                return ref
        raise KeyError(name)
