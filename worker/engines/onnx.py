"""ONNX Runtime engine: named tensors in, named and typed tensors out.

Inputs are checked against the session's declared inputs before anything runs (names, dtype,
rank, fixed dimensions, total size), so a malformed request gets a precise ``bad_request``
instead of an opaque runtime error. Error messages name tensors, dtypes and shapes, never
values.

Float inputs may carry OpenGradient-style fixed-point elements ``{"value": V, "decimals": D}``
(see ``schemas.requests.Tensor``), converted to the float nearest ``V / 10**D`` before the
dtype cast. String tensors (``tensor(string)`` inputs) are fed as numpy object arrays.

Sessions are cached per process by model digest: two served names for the same artifact share
one ``InferenceSession`` (the cache holds it weakly, so it goes when the last engine does).
One intra-op thread per session: the worker scales by running requests concurrently (sessions
are safe to call from several threads) rather than by fanning one small request over every
core.
"""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from schemas import limits
from schemas.fixedpoint import fixed_point_float
from schemas.requests import ChatInput, MLInput, Tensor, TensorDType
from schemas.results import ErrorCode, MLOutput, Usage
from worker.engines.base import EngineResult, RunContext
from worker.engines.threads import EngineThreads
from worker.errors import PermanentError
from worker.modelstore.refs import ModelRef

__all__ = ["OnnxEngine"]

_INSTALL_HINT = "pip install onnxruntime (a core dependency of verifiable-inference-node)"
DEFAULT_MAX_INPUT_ELEMENTS = limits.MAX_TENSOR_ELEMENTS
"""Total elements over all input tensors of one request. The wire limit is per tensor; a
request of 32 maximal tensors would otherwise ask for 2M elements of work."""

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


class _Session:
    """An ``InferenceSession`` plus its signature; weak-referenceable for the cache."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = {arg.name: arg for arg in session.get_inputs()}
        self.output_names = [arg.name for arg in session.get_outputs()]


_SESSIONS: weakref.WeakValueDictionary[str, _Session] = weakref.WeakValueDictionary()
_SESSIONS_LOCK = threading.Lock()


def _open_session(ref: ModelRef, path: Path) -> _Session:
    """The process's session for ``ref.digest``, created on first use (blocking)."""
    with _SESSIONS_LOCK:
        cached = _SESSIONS.get(ref.digest)
        if cached is not None:
            return cached
        ort = _import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own Exception subclasses
            raise PermanentError(
                f"model {ref.name}: ONNX Runtime cannot load the artifact ({type(e).__name__})",
                code=ErrorCode.INTERNAL,
                model=ref.name,
            ) from e
        opened = _Session(session)
        _SESSIONS[ref.digest] = opened
        return opened


ONNX_THREADS = 2
"""Threads of one ONNX engine: its calls are short; ONNX Runtime parallelises inside one."""


class OnnxEngine:
    """Runs one ONNX model on the CPU. Build it with ``await OnnxEngine.load(ref, path)``."""

    def __init__(
        self,
        ref: ModelRef,
        path: Path,
        *,
        on_close: Callable[[], None] | None = None,
        max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS,
    ) -> None:
        """Open (or reuse) the session synchronously; ``load`` does it in a thread."""
        self._ref = ref
        self._session: _Session | None = _open_session(ref, path)
        self._on_close = on_close
        self._max_elements = max_input_elements
        self._threads = EngineThreads(ref.name, ONNX_THREADS)

    @classmethod
    async def load(
        cls, ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
    ) -> OnnxEngine:
        return await asyncio.to_thread(cls, ref, path, on_close=on_close)

    @property
    def model_name(self) -> str:
        return self._ref.name

    @property
    def model_digest(self) -> str:
        return self._ref.digest

    @property
    def input_names(self) -> list[str]:
        return sorted(self._live().inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._live().output_names)

    async def run(
        self, payload: ChatInput | MLInput, ctx: RunContext | None = None
    ) -> EngineResult:
        if not isinstance(payload, MLInput):
            raise self._bad_request(f"model {self._ref.name} takes ml tensors, not chat messages")
        session = self._live()
        feeds = self._feeds(session, payload)
        outputs = await self._threads.run(self._infer, session, feeds)
        return EngineResult(output=self._to_output(session, outputs), usage=Usage())

    async def close(self) -> None:
        # Dropping the reference lets the weak session cache free the session once no other
        # engine shares it; the lease on the cached file goes with it.
        self._session = None
        self._threads.shutdown()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def _live(self) -> _Session:
        if self._session is None:
            raise PermanentError(
                f"model {self._ref.name} is unloaded", code=ErrorCode.INTERNAL, model=self._ref.name
            )
        return self._session

    def _feeds(self, session: _Session, payload: MLInput) -> dict[str, np.ndarray[Any, Any]]:
        expected, received = set(session.inputs), set(payload.tensors)
        if missing := sorted(expected - received):
            raise self._bad_request(f"missing input tensor(s): {', '.join(missing)}")
        # Messages name only the model's own facts (its inputs, shapes, limits), never what the
        # request sent: a tensor name, count or shape may itself be private (and is sealed).
        if received - expected:
            raise self._bad_request(
                f"the request has input tensor(s) the model does not take; "
                f"model takes {', '.join(sorted(expected))}"
            )
        total = sum(len(t.data) for t in payload.tensors.values())
        if total > self._max_elements:
            raise self._bad_request(
                f"input too large: this model takes at most {self._max_elements} elements in all"
            )
        return {
            name: self._convert(session, name, tensor) for name, tensor in payload.tensors.items()
        }

    def _convert(self, session: _Session, name: str, tensor: Tensor) -> np.ndarray[Any, Any]:
        arg = session.inputs[name]
        want_dtype = _ORT_TO_WIRE.get(arg.type)
        if want_dtype is None:
            raise PermanentError(
                f"model {self._ref.name}: input {name} has unsupported type {arg.type}",
                code=ErrorCode.INTERNAL,
                model=self._ref.name,
            )
        if tensor.dtype != want_dtype:
            raise self._bad_request(f"input {name}: expected dtype {want_dtype}")
        self._check_shape(name, arg.shape, tensor.shape)
        data: list[Any] = tensor.data
        if want_dtype in {"float32", "float64"}:
            data = [fixed_point_float(v) if isinstance(v, dict) else v for v in data]
        with np.errstate(over="ignore"):  # overflow is reported below, not as a warning
            array = np.array(data, dtype=_WIRE_TO_NUMPY[want_dtype])
        if want_dtype == "float32" and not np.isfinite(array).all():
            raise self._bad_request(f"input {name}: values out of float32 range")
        return array.reshape(tensor.shape)

    def _check_shape(self, name: str, declared: list[Any] | None, got: list[int]) -> None:
        if declared is None:
            return
        shown = [d if isinstance(d, int) else "?" for d in declared]
        if len(got) != len(declared):
            raise self._bad_request(f"input {name}: expected rank {len(declared)} shape {shown}")
        for want, size in zip(declared, got, strict=True):
            # A dimension given as a name ("N") or None is dynamic: any size is fine.
            if isinstance(want, int) and want >= 0 and want != size:
                raise self._bad_request(f"input {name}: expected shape {shown}")

    def _infer(self, session: _Session, feeds: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
        try:
            result: list[Any] = session.session.run(session.output_names, feeds)
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

    def _to_output(self, session: _Session, outputs: list[Any]) -> MLOutput:
        tensors: dict[str, Tensor] = {}
        for name, value in zip(session.output_names, outputs, strict=True):
            array = np.asarray(value)
            dtype = _numpy_to_wire(array.dtype)
            if dtype is None:
                raise self._internal(f"output {name} has unsupported dtype {array.dtype}")
            data = array.ravel().tolist()
            if dtype in {"float32", "float64"} and not all(math.isfinite(v) for v in data):
                raise self._internal(f"model produced non-finite values in {name}")
            try:
                tensors[name] = Tensor(dtype=dtype, shape=list(array.shape), data=data)
            except ValidationError as e:
                raise self._internal(
                    f"output {name} of shape {list(array.shape)} exceeds the wire limits"
                ) from e
        return MLOutput(tensors=tensors)

    def _bad_request(self, message: str) -> PermanentError:
        return PermanentError(message, code=ErrorCode.BAD_REQUEST, model=self._ref.name)

    def _internal(self, message: str) -> PermanentError:
        return PermanentError(
            f"model {self._ref.name}: {message}", code=ErrorCode.INTERNAL, model=self._ref.name
        )


def _numpy_to_wire(dtype: np.dtype[Any]) -> TensorDType | None:
    if dtype.kind in {"U", "O"}:
        return "string"
    return _NUMPY_TO_WIRE.get(dtype)
