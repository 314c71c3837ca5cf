"""ZKML checks both sides make: do a proof's public instances match the tensors it claims?
(pure). The prover checks what EZKL proved before it signs a proof record; settlement checks
the same before it verifies the SNARK (``docs/protocol/zkml.md``)."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.fixedpoint import dequantize, element_float, quantize
from schemas.proofs import CircuitManifest
from schemas.requests import MLInput
from schemas.results import MLOutput

__all__ = ["instance_problem"]


def instance_problem(
    m: CircuitManifest,
    model_input: MLInput,
    output: MLOutput,
    public_inputs: Sequence[Sequence[int]],
    public_outputs: Sequence[Sequence[int]],
) -> tuple[str, str] | None:
    """Why these public instances do not prove ``output`` from ``model_input`` under circuit
    ``m`` (a rejection reason and a detail naming circuit tensors only), or None.

    Inputs must be exactly ``quantize(x, scale)`` of the carried input; outputs, rescaled,
    within the circuit's pinned ``output_tolerance`` of the signed output (the circuit computes
    in fixed point, the runtime in float32)."""
    if len(public_inputs) != len(m.inputs) or len(public_outputs) != len(m.outputs):
        return "bad_instances", "instance count differs from the circuit's"
    if set(model_input.tensors) != {t.name for t in m.inputs}:
        return "bad_instances", "input tensors differ from the circuit's"
    if set(output.tensors) != {t.name for t in m.outputs}:
        return "bad_instances", "output tensors differ from the circuit's (all must be proved)"
    for spec, public in zip(m.inputs, public_inputs, strict=True):
        tensor = model_input.tensors[spec.name]
        if tensor.shape != spec.shape or len(public) != spec.size:
            return "bad_instances", f"input {spec.name}: shape differs from the circuit's"
        if tensor.dtype not in {"float32", "float64"}:
            return "bad_instances", f"input {spec.name}: not a float tensor"
        kind = spec.input_type or "F32"
        if [quantize(element_float(x), spec.scale, kind) for x in tensor.data] != public:
            return "input_instances_mismatch", f"input {spec.name}"
    for spec, public in zip(m.outputs, public_outputs, strict=True):
        out = output.tensors.get(spec.name)
        if out is None or out.shape != spec.shape or len(public) != spec.size:
            return "bad_instances", f"output {spec.name}: missing or shaped differently"
        if out.dtype not in {"float32", "float64"}:
            return "bad_instances", f"output {spec.name}: not a float tensor"
        for q, value in zip(public, out.data, strict=True):
            if abs(dequantize(q, spec.scale) - element_float(value)) > m.output_tolerance:
                return "output_out_of_tolerance", f"output {spec.name}"
    return None
