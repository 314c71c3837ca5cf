"""Client library for producers: build requests, send them, await and verify replies."""

from client.registry import RegistryPolicy, RegistryView, RegistryWatcher
from client.requests import build_request, new_request_id, parse_payload
from client.sealing import SealedReplyError, SealedRequest, seal_request
from client.settings import ClientSettings
from client.streaming import check_stream, reassemble
from client.transport import InferenceClient, NoActiveNodes, ReplyTimeout
from client.verify import Check, VerificationReport, verify_result

__all__ = [
    "Check",
    "ClientSettings",
    "InferenceClient",
    "NoActiveNodes",
    "RegistryPolicy",
    "RegistryView",
    "RegistryWatcher",
    "ReplyTimeout",
    "SealedReplyError",
    "SealedRequest",
    "VerificationReport",
    "build_request",
    "check_stream",
    "new_request_id",
    "parse_payload",
    "reassemble",
    "seal_request",
    "verify_result",
]
