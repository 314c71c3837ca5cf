"""Local HTTP servers that speak the OpenAI and Anthropic wire formats, for proxy tests.

The real SDKs talk to them (``base_url`` pointed at ``ProviderServer.url``); every request is
recorded so tests can assert what reached the "provider".
"""
