"""Client library for producers: build requests, send them, await and verify replies."""

from client.requests import build_request, new_request_id, parse_payload
from client.settings import ClientSettings
from client.transport import InferenceClient, ReplyTimeout
from client.verify import Check, VerificationReport, verify_result

__all__ = [
    "Check",
    "ClientSettings",
    "InferenceClient",
    "ReplyTimeout",
    "VerificationReport",
    "build_request",
    "new_request_id",
    "parse_payload",
    "verify_result",
]
