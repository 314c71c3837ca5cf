"""Usage metering for proxied models: tokens in, tokens out, and what they cost the node.

Prices are integer micro-units of a currency per million tokens (``ModelPrices``); the cost of
a call is ``ceil((in_tokens * in_price + out_tokens * out_price) / 1_000_000)`` micro-units,
all in integers (no floats for money; rounding up so the node never under-counts a cost).
The signed ``Usage`` stays tokens only; cost is local accounting for the node's operator.

Hook: every proxy engine has a ``meter`` (``UsageMeter``) with running totals and a list of
listeners called with each ``UsageRecord`` (the metrics work subscribes there). Records carry
ids and counts, never prompts or outputs. A failing listener is logged and ignored: metering
must never fail a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from worker.proxy.settings import ModelPrices

__all__ = ["UsageListener", "UsageMeter", "UsageRecord", "UsageTotals", "cost_micros"]

log = logging.getLogger(__name__)

_PER_MTOK = 1_000_000


def cost_micros(input_tokens: int, output_tokens: int, prices: ModelPrices) -> int:
    total = (
        input_tokens * prices.input_micros_per_mtok + output_tokens * prices.output_micros_per_mtok
    )
    return -(-total // _PER_MTOK)


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    model: str
    provider: str
    endpoint: str
    input_tokens: int
    output_tokens: int
    cost_micros: int
    currency: str


@dataclass
class UsageTotals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0


UsageListener = Callable[[UsageRecord], None]


class UsageMeter:
    """Per-engine totals plus listeners; synchronous and cheap (called on the event loop)."""

    def __init__(self, model: str, provider: str, prices: ModelPrices) -> None:
        self.model = model
        self.provider = provider
        self.prices = prices
        self.totals = UsageTotals()
        self.listeners: list[UsageListener] = []

    def record(
        self, request_id: str, endpoint: str, input_tokens: int, output_tokens: int
    ) -> UsageRecord:
        record = UsageRecord(
            request_id=request_id,
            model=self.model,
            provider=self.provider,
            endpoint=endpoint,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_micros=cost_micros(input_tokens, output_tokens, self.prices),
            currency=self.prices.currency,
        )
        self.totals.requests += 1
        self.totals.input_tokens += input_tokens
        self.totals.output_tokens += output_tokens
        self.totals.cost_micros += record.cost_micros
        for listener in self.listeners:
            try:
                listener(record)
            except Exception as e:
                log.error(
                    "usage listener failed",
                    extra={"model": self.model, "error_type": type(e).__name__},
                )
        return record
