"""Deploy the Settlement contract on the compose stack's anvil, once (compose service
``contract``). Idempotent: when the expected address already holds code, nothing is sent.

anvil's account 0 deploys at nonce 0, so the contract lands at a fixed address that the
settlement service is configured with. Development keys only: they are public.
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3

from infra.dev.anvil import DEV_ACCOUNTS, dev_private_key
from settlement.chain import ChainSettings, SettlementChain


async def main() -> int:
    rpc_url = os.environ.get("RPC_URL", "http://anvil:8545")
    expected = os.environ["EXPECTED_ADDRESS"]
    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
    try:
        code = await w3.eth.get_code(AsyncWeb3.to_checksum_address(expected))
    finally:
        await w3.provider.disconnect()
    if len(code) > 0:
        print(f"Settlement already deployed at {expected}")
        return 0
    settings = ChainSettings(rpc_url=rpc_url, relayer_key=SecretStr(dev_private_key(0)))
    address = await SettlementChain.deploy(settings, DEV_ACCOUNTS[0])
    print(f"Settlement deployed at {address}")
    if address.lower() != expected.lower():
        sys.stderr.write(f"expected {expected}: the chain already had transactions\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
