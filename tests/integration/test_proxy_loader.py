"""The proxy engine loader (``worker.proxy.loader``) against a local provider server: models
served through one endpoint share one SDK client, closed when the last of them closes."""

from __future__ import annotations

from tests.harness.providers.helpers import engines
from tests.harness.providers.server import ProviderServer
from worker.proxy.settings import ProxySettings


async def test_models_on_one_endpoint_share_one_client() -> None:
    async with ProviderServer() as server:
        settings = ProxySettings.model_validate(
            {
                "endpoints": {"e": {"provider": "openai", "base_url": server.url, "api_key": "k"}},
                "models": [
                    {"name": "m1", "provider": "openai", "api_model": "a", "endpoints": ["e"]},
                    {
                        "name": "m2",
                        "provider": "openai",
                        "api": "completions",
                        "api_model": "b",
                        "endpoints": ["e"],
                    },
                ],
            }
        )
        async with engines(settings) as loaded:
            assert loaded["m1"]._slots[0].client is loaded["m2"]._slots[0].client
            client = loaded["m1"]._slots[0].client
            await loaded["m1"].close()
            assert not client.is_closed()  # m2 still holds it
        assert client.is_closed()
