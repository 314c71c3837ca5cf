"""Fixed-point numbers of the protocol (pure): OpenGradient-style ``{"value", "decimals"}``
tensor elements, and EZKL's quantisation of floats into BN254 field elements.

One home for the arithmetic the ONNX engine (reading inputs), the ZKML prover (checking what
EZKL proved) and settlement (checking a proof record) must agree on bit for bit.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final, Literal

__all__ = [
    "BN254_SCALAR_MODULUS",
    "InputType",
    "dequantize",
    "element_float",
    "felt_hex",
    "felt_to_int",
    "fixed_point_float",
    "quantize",
]

BN254_SCALAR_MODULUS: Final = (
    21888242871839275222246405745257275088548364400416034343698204186575808495617
)
InputType = Literal["F32", "F64"]


def fixed_point_float(element: dict[str, Any]) -> float:
    """The double nearest ``value / 10**decimals`` (int / int is correctly rounded)."""
    return float(element["value"] / 10 ** element["decimals"])


def _round_half_away(value: float) -> int:
    # Rust's f64::round: halves go away from zero. ``a - floor(a)`` is exact for doubles.
    magnitude = abs(value)
    whole = math.floor(magnitude)
    if magnitude - whole >= 0.5:
        whole += 1
    return -whole if value < 0 else whole


def element_float(element: bool | int | float | str | dict[str, Any]) -> float:
    """The number a float tensor element stands for, as the ONNX engine reads it: a JSON
    number, or a fixed-point ``{"value": V, "decimals": D}`` as the double nearest
    ``V / 10**D``. ``ValueError`` for anything else."""
    if isinstance(element, bool) or isinstance(element, str):
        raise ValueError("not a number")
    if isinstance(element, dict):
        return fixed_point_float(element)
    return float(element)


def quantize(value: float, scale: int, input_type: InputType = "F32") -> int:
    """EZKL's fixed-point encoding of one input element: ``round(x * 2**scale)``, halves away
    from zero, after rounding ``x`` to float32 when the input type is ``F32``."""
    x = float(value)
    if input_type == "F32":
        x = struct.unpack("<f", struct.pack("<f", x))[0]
    return _round_half_away(x * 2.0**scale)


def dequantize(q: int, scale: int) -> float:
    return q / 2.0**scale


def felt_hex(value: int) -> str:
    """A signed integer as EZKL writes a BN254 field element: ``value mod r``, 32 bytes
    little-endian, lower-case hex."""
    return (value % BN254_SCALAR_MODULUS).to_bytes(32, "little").hex()


def felt_to_int(felt: str) -> int:
    """Inverse of ``felt_hex`` for values in (-r/2, r/2)."""
    value = int.from_bytes(bytes.fromhex(felt), "little")
    if value >= BN254_SCALAR_MODULUS:
        raise ValueError("not a canonical field element")
    return value - BN254_SCALAR_MODULUS if value > BN254_SCALAR_MODULUS // 2 else value
