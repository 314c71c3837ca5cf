"""The ONNX engine on a purpose-built model: named inputs of several dtypes (float, int64,
string), fixed-point inputs, validation errors as typed error replies, the session cache."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infra.dev.demo_models import add_model
from schemas.requests import InferenceRequest, MLInput
from schemas.results import ErrorCode, ErrorReply, InferenceResult, MLOutput
from schemas.signing import Signer
from tests.harness.pipeline import CHAIN_SIGNER
from worker.engines import load_engine
from worker.engines.onnx import _SESSIONS, OnnxEngine
from worker.errors import PermanentError
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import ModelFormat, ModelRef
from worker.pipeline import Pipeline

NOW_MS = 1_795_000_000_000
SECRET = [1234.5, -987.25, 31337.0, 4242.75]


def _model_bytes() -> bytes:
    """y = x * scale (float32 [N,4] x [1]), ids -> ids_out (int64 [3]), label -> label_out
    (string [1]): one model exercising every input kind the wire carries."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["y"]),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
            helper.make_node("Identity", ["label"], ["label_out"]),
            helper.make_node("Cast", ["x64"], ["x64_out"], to=TensorProto.DOUBLE),
        ],
        "typed",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
            helper.make_tensor_value_info("x64", TensorProto.DOUBLE, [2]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("label_out", TensorProto.STRING, [1]),
            helper.make_tensor_value_info("x64_out", TensorProto.DOUBLE, [2]),
        ],
        initializer=[numpy_helper.from_array(np.zeros(0, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _inputs(**override: Any) -> dict[str, Any]:
    tensors: dict[str, Any] = {
        "x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]},
        "scale": {"dtype": "float32", "shape": [1], "data": [2.0]},
        "ids": {"dtype": "int64", "shape": [3], "data": [1, 2, 2**53 - 1]},
        "label": {"dtype": "string", "shape": [1], "data": ["héllo"]},
        "x64": {"dtype": "float64", "shape": [2], "data": [0.1, 2.5]},
    }
    tensors.update(override)
    return {"kind": "ml", "tensors": {k: v for k, v in tensors.items() if v is not None}}


@pytest.fixture(scope="module")
def typed_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRef, Path]:
    root = tmp_path_factory.mktemp("typed-hub")
    ref = add_model(root, "typed", ModelFormat.ONNX, _model_bytes(), _inputs())
    return ref, LocalHub(root).materialize(ref, root / "cache")


@pytest.fixture
async def engine(typed_ref: tuple[ModelRef, Path]) -> OnnxEngine:
    loaded = await load_engine(*typed_ref)
    assert isinstance(loaded, OnnxEngine)
    return loaded


async def _run(engine: OnnxEngine, payload: dict[str, Any]) -> MLOutput:
    result = await engine.run(MLInput.model_validate(payload))
    assert isinstance(result.output, MLOutput)
    return result.output


async def test_named_inputs_give_named_typed_outputs(engine: OnnxEngine) -> None:
    assert engine.input_names == ["ids", "label", "scale", "x", "x64"]
    out = await _run(engine, _inputs())
    assert set(out.tensors) == {"y", "ids_out", "label_out", "x64_out"}
    assert out.tensors["y"].dtype == "float32" and out.tensors["y"].shape == [1, 4]
    assert out.tensors["y"].data == [1.0, -2.0, 4.0, 0.5]
    assert out.tensors["ids_out"].dtype == "int64"
    assert out.tensors["ids_out"].data == [1, 2, 2**53 - 1]
    assert out.tensors["label_out"].dtype == "string"
    assert out.tensors["label_out"].data == ["héllo"]
    assert out.tensors["x64_out"].dtype == "float64"


async def test_fixed_point_inputs_equal_their_float_values(engine: OnnxEngine) -> None:
    fixed = _inputs(
        x={
            "dtype": "float32",
            "shape": [1, 4],
            "data": [
                {"value": 5, "decimals": 1},
                {"value": -1, "decimals": 0},
                2.0,  # mixed with plain floats
                {"value": 25, "decimals": 2},
            ],
        },
        x64={"dtype": "float64", "shape": [2], "data": [{"value": 1, "decimals": 1}, 2.5]},
    )
    assert await _run(engine, fixed) == await _run(engine, _inputs())
    out = await _run(engine, fixed)
    assert out.tensors["x64_out"].data[0] == 0.1  # the double nearest 1/10, exactly


def _tensor(dtype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


@pytest.mark.parametrize(
    ("payload", "expected", "sent"),
    [
        (_inputs(x=None), "missing input tensor(s): x", []),
        (
            _inputs(extra_patient_id=_tensor("float32", [1], [5555.5])),
            "input tensor(s) the model does not take; model takes",
            ["extra_patient_id"],
        ),
        (_inputs(x=_tensor("float64", [1, 4], SECRET)), "expected dtype float32", ["float64"]),
        (_inputs(ids=_tensor("int32", [3], [1, 2, 3])), "expected dtype int64", ["int32"]),
        (_inputs(label=_tensor("float32", [1], [1.0])), "expected dtype string", []),
        (_inputs(x=_tensor("float32", [4], SECRET)), "expected rank 2", ["[4]", "rank 1"]),
        (_inputs(x=_tensor("float32", [2, 2], SECRET)), "expected shape ['?', 4]", ["[2, 2]"]),
        (_inputs(x=_tensor("float32", [100, 4], [0.0] * 400)), "input too large", ["400"]),
        (_inputs(x=_tensor("float32", [1, 4], [1e39, 0.0, 0.0, 0.0])), "out of float32 range", []),
    ],
    ids=[
        "missing",
        "unexpected",
        "dtype",
        "int-dtype",
        "string-dtype",
        "rank",
        "dim",
        "too-large",
        "float32-overflow",
    ],
)
async def test_invalid_inputs_are_typed_errors(
    typed_ref: tuple[ModelRef, Path], payload: dict[str, Any], expected: str, sent: list[str]
) -> None:
    """Typed, and naming only the model's facts: no value, name, dtype, shape or count the
    request sent (it may be private, and a sealed request's error says no more than this)."""
    engine = OnnxEngine(*typed_ref, max_input_elements=100)
    with pytest.raises(PermanentError) as info:
        await engine.run(MLInput.model_validate(payload))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert expected in info.value.message
    for value in [*SECRET, 5555.5, *sent]:
        assert str(value) not in info.value.message


def test_fixed_point_is_refused_outside_float_tensors() -> None:
    with pytest.raises(ValueError, match="fixed-point"):
        MLInput.model_validate(
            _inputs(ids=_tensor("int64", [3], [{"value": 1, "decimals": 0}, 2, 3]))
        )


async def test_validation_errors_become_error_replies(engine: OnnxEngine) -> None:
    pipeline = Pipeline(
        {"typed": engine}, Signer(b"\x01" * 32), CHAIN_SIGNER, clock_ms=lambda: NOW_MS
    )

    def request(payload: dict[str, Any]) -> InferenceRequest:
        return InferenceRequest.model_validate(
            {"request_id": "r-1", "model": "typed", "created_unix_ms": NOW_MS, "payload": payload}
        )

    bad = await pipeline.handle(request(_inputs(x=_tensor("float32", [2, 2], SECRET))))
    assert isinstance(bad.reply, ErrorReply) and bad.record is None
    assert bad.reply.code is ErrorCode.BAD_REQUEST and not bad.reply.retryable
    assert "expected shape" in bad.reply.message and "1234.5" not in bad.reply.message
    good = await pipeline.handle(request(_inputs()))
    assert isinstance(good.reply, InferenceResult)


async def test_engines_of_one_digest_share_a_session(typed_ref: tuple[ModelRef, Path]) -> None:
    ref, path = typed_ref
    closed: list[str] = []
    first = await OnnxEngine.load(ref, path, on_close=lambda: closed.append("first"))
    second = await OnnxEngine.load(ref, path)
    assert first._session is second._session
    await first.close()
    await first.close()  # idempotent: the lease is released once
    assert closed == ["first"]
    assert await _run(second, _inputs())  # still serving from the shared session
    await second.close()
    with pytest.raises(PermanentError, match="unloaded"):
        await second.run(MLInput.model_validate(_inputs()))
    gc.collect()
    assert ref.digest not in _SESSIONS
