"""Batch input files for the batch-job tests: a mix of ML, chat (ours and OpenAI's shape) and
invalid lines in a fixed shuffled order, with the outcome each line must end with."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["SECRET", "BatchFile", "write_batch_file"]

SECRET = "batch-secret-marker"
"""In every chat prompt: nothing the CLI prints may contain it."""


class BatchFile:
    def __init__(self, path: Path, expected: dict[int, str]) -> None:
        self.path = path
        self.expected = expected
        """line number -> ``result``, ``error:<code>`` or ``invalid_line``."""

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.expected.values())


def _ml(i: int, *, good: bool = True) -> dict[str, Any]:
    row = [i / 10, -i / 20, 1.0, float(i % 7)]
    shape = [1, 4] if good else [1, 2]
    data = row if good else row[:2]
    return {
        "custom_id": f"ml-{i}",
        "model": "demo-mlp",
        "body": {
            "kind": "ml",
            "tensors": {"x": {"dtype": "float32", "shape": shape, "data": data}},
        },
    }


def _chat(i: int) -> dict[str, Any]:
    prompt = f"{SECRET} question {i}"
    if i % 2:
        return {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "demo-lm",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 2 + i % 3,
                "seed": i,
            },
        }
    return {
        "custom_id": f"chat-{i}",
        "model": "demo-lm",
        "body": {
            "kind": "chat",
            "messages": [{"role": "user", "content": prompt}],
            "params": {"max_tokens": 2 + i % 3, "temperature": 0.7, "seed": i},
        },
    }


def _invalid(i: int) -> bytes:
    variants: list[bytes] = [
        b"{not json " + SECRET.encode(),
        json.dumps({"model": "demo-mlp", "body": {"kind": "ml"}}).encode(),  # no custom_id
        json.dumps({"custom_id": f"bad-{i}", "model": "demo-lm", "body": {"kind": "x"}}).encode(),
        json.dumps(_ml(0)).encode(),  # repeats line 1's custom_id
        b"",
    ]
    return variants[i % len(variants)]


def write_batch_file(
    path: Path, *, ml: int, chat: int, invalid: int, bad_shape: int = 0, seed: int = 7
) -> BatchFile:
    """``ml`` ML lines (``bad_shape`` of them answered ``bad_request`` by the worker), ``chat``
    chat lines and ``invalid`` invalid lines, shuffled (the first line is always ``ml-0``, so a
    repeated ``custom_id`` comes after it)."""
    kinds = ["ml"] * (ml - bad_shape - 1) + ["bad"] * bad_shape + ["chat"] * chat
    kinds += ["invalid"] * invalid
    random.Random(seed).shuffle(kinds)
    kinds.insert(0, "ml")
    lines: list[bytes] = []
    expected: dict[int, str] = {}
    for number, kind in enumerate(kinds, start=1):
        if kind == "invalid":
            lines.append(_invalid(number))
            expected[number] = "invalid_line"
        elif kind == "chat":
            lines.append(json.dumps(_chat(number)).encode())
            expected[number] = "result"
        else:
            lines.append(json.dumps(_ml(0 if number == 1 else number, good=kind == "ml")).encode())
            expected[number] = "result" if kind == "ml" else "error:bad_request"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return BatchFile(path, expected)
