"""ONNX Runtime engine: named tensors in, named tensors out.

Inputs are checked against the session's declared inputs before anything runs (names, dtype,
rank, fixed dimensions), so a malformed request gets a precise ``bad_request`` instead of an
opaque runtime error. Error messages name tensors, dtypes and shapes, never values.

One session per engine, one intra-op thread: the worker scales by running requests
concurrently (ONNX Runtime sessions are safe to call from several threads) rather than by
fanning one small request out over every core.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from schemas.requests import ChatInput, MLInput, Tensor, TensorDType
from schemas.results import ErrorCode, MLOutput, Usage
from worker.engines.base import EngineResult, RunContext
from worker.errors import PermanentError
from worker.models.refs import ModelRef

__all__ = ["OnnxEngine"]

_INSTALL_HINT = "pip install onnxruntime (a core dependency of verifiable-inference-node)"

# ONNX Runtime type strings <-> wire dtypes <-> numpy dtypes.
_ORT_TO_WIRE: dict[str, TensorDType] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
_WIRE_TO_NUMPY: dict[str, Any] = {
    "float32": np.float32,
    "float64": np.float64,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
    "string": object,
}
_NUMPY_TO_WIRE: dict[np.dtype[Any], TensorDType] = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.bool_): "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped,unused-ignore]
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise ImportError(f"the ONNX engine needs onnxruntime: {_INSTALL_HINT}") from e
    return onnxruntime


class OnnxEngine:
    """Runs one ONNX model on the CPU. Build it with ``await OnnxEngine.load(ref, path)``."""

    def __init__(self, ref: ModelRef, path: Path) -> None:
        """Create the session synchronously (blocking; ``load`` does it in a thread)."""
        ort = _import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own Exception subclasses
            raise PermanentError(
                f"model {ref.name}: ONNX Runtime cannot load the artifact ({type(e).__name__})",
                code=ErrorCode.INTERNAL,
                model=ref.name,
            ) from e
        self._ref = ref
        self._inputs = {arg.name: arg for arg in self._session.get_inputs()}
        self._output_names = [arg.name for arg in self._session.get_outputs()]

    @classmethod
    async def load(cls, ref: ModelRef, path: Path) -> OnnxEngine:
        return await asyncio.to_thread(cls, ref, path)

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        if not isinstance(payload, MLInput):
            raise self._bad_request(f"model {self._ref.name} takes ml tensors, not chat messages")
        feeds = self._feeds(payload)
        outputs = await asyncio.to_thread(self._infer, feeds)
        return EngineResult(output=self._to_output(outputs), usage=Usage())

    async def close(self) -> None:
        # The session is freed with the engine; nothing to flush.
        return None

    def _feeds(self, payload: MLInput) -> dict[str, np.ndarray[Any, Any]]:
        expected, received = set(self._inputs), set(payload.tensors)
        if missing := sorted(expected - received):
            raise self._bad_request(f"missing input tensor(s): {', '.join(missing)}")
        if unexpected := sorted(received - expected):
            raise self._bad_request(
                f"unexpected input tensor(s): {', '.join(unexpected)}; "
                f"model takes {', '.join(sorted(expected))}"
            )
        return {name: self._convert(name, tensor) for name, tensor in payload.tensors.items()}

    def _convert(self, name: str, tensor: Tensor) -> np.ndarray[Any, Any]:
        arg = self._inputs[name]
        want_dtype = _ORT_TO_WIRE.get(arg.type)
        if want_dtype is None:
            raise PermanentError(
                f"model {self._ref.name}: input {name} has unsupported type {arg.type}",
                code=ErrorCode.INTERNAL,
                model=self._ref.name,
            )
        if tensor.dtype != want_dtype:
            raise self._bad_request(
                f"input {name}: expected dtype {want_dtype}, got {tensor.dtype}"
            )
        want_shape = list(arg.shape) if arg.shape is not None else None
        if want_shape is not None:
            shown = [d if isinstance(d, int) else "?" for d in want_shape]
            if len(tensor.shape) != len(want_shape):
                raise self._bad_request(
                    f"input {name}: expected rank {len(want_shape)} shape {shown}, "
                    f"got rank {len(tensor.shape)} shape {tensor.shape}"
                )
            for want, got in zip(want_shape, tensor.shape, strict=True):
                # A dimension given as a name ("N") or None is dynamic: any size is fine.
                if isinstance(want, int) and want >= 0 and want != got:
                    raise self._bad_request(
                        f"input {name}: expected shape {shown}, got {tensor.shape}"
                    )
        with np.errstate(over="ignore"):  # overflow is reported below, not as a warning
            array = np.array(tensor.data, dtype=_WIRE_TO_NUMPY[want_dtype])
        if want_dtype == "float32" and not np.isfinite(array).all():
            raise self._bad_request(f"input {name}: values out of float32 range")
        return array.reshape(tensor.shape)

    def _infer(self, feeds: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
        try:
            result: list[Any] = self._session.run(self._output_names, feeds)
        except Exception as e:
            # ORT messages can quote shapes but not tensor contents; still, only the exception
            # type goes into the reply, the full text stays on the chained cause for the logs.
            code = (
                ErrorCode.BAD_REQUEST
                if type(e).__name__ in {"InvalidArgument", "InvalidGraph"}
                else ErrorCode.INTERNAL
            )
            raise PermanentError(
                f"model {self._ref.name}: ONNX Runtime rejected the run ({type(e).__name__})",
                code=code,
                model=self._ref.name,
            ) from e
        return result

    def _to_output(self, outputs: list[Any]) -> MLOutput:
        tensors: dict[str, Tensor] = {}
        for name, value in zip(self._output_names, outputs, strict=True):
            array = np.asarray(value)
            dtype = _numpy_to_wire(array.dtype)
            if dtype is None:
                raise PermanentError(
                    f"model {self._ref.name}: output {name} has unsupported dtype {array.dtype}",
                    code=ErrorCode.INTERNAL,
                    model=self._ref.name,
                )
            data = array.ravel().tolist()
            if dtype in {"float32", "float64"} and not all(math.isfinite(v) for v in data):
                raise PermanentError(
                    f"model {self._ref.name}: model produced non-finite values in {name}",
                    code=ErrorCode.INTERNAL,
                    model=self._ref.name,
                )
            try:
                tensors[name] = Tensor(dtype=dtype, shape=list(array.shape), data=data)
            except ValidationError as e:
                raise PermanentError(
                    f"model {self._ref.name}: output {name} of shape {list(array.shape)} "
                    "exceeds the wire limits",
                    code=ErrorCode.INTERNAL,
                    model=self._ref.name,
                ) from e
        return MLOutput(tensors=tensors)

    def _bad_request(self, message: str) -> PermanentError:
        return PermanentError(message, code=ErrorCode.BAD_REQUEST, model=self._ref.name)


def _numpy_to_wire(dtype: np.dtype[Any]) -> TensorDType | None:
    if dtype.kind in {"U", "O"}:
        return "string"
    return _NUMPY_TO_WIRE.get(dtype)
