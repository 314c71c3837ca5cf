"""The LLM proxy: proxied models served by calling OpenAI or Anthropic with the node's own keys.

Modules: ``settings`` (endpoints and the proxied-model registry), ``translate`` (our chat
format → each provider), ``assemble`` (provider pieces → the ``ChatOutput`` clients receive),
``errors`` (failure classification, typed errors), ``resilience`` (retries, Retry-After,
failover, circuit breakers), ``metering`` (token cost hook), ``engine`` (what provider engines
share) and ``loader``. The provider engines live in ``worker.proxy.openai_engine`` and
``worker.proxy.anthropic_engine``. See docs/PROXY.md.
"""

from worker.proxy.loader import load_proxy_engines
from worker.proxy.metering import UsageMeter, UsageRecord
from worker.proxy.settings import Endpoint, ModelPrices, Provider, ProxiedModel, ProxySettings

__all__ = [
    "Endpoint",
    "ModelPrices",
    "Provider",
    "ProxiedModel",
    "ProxySettings",
    "UsageMeter",
    "UsageRecord",
    "load_proxy_engines",
]
