"""Client library for producers: build requests, send them, await and verify replies."""

from client.requests import build_request, new_request_id, parse_payload
from client.settings import ClientSettings
from client.streaming import check_stream, reassemble
from client.transport import InferenceClient, NoActiveNodes, ReplyTimeout
from schemas.sealing import SealedReplyError, SealedRequest, seal_request
from schemas.verify.registry import RegistryPolicy, RegistryView
from schemas.verify.result import Check, VerificationReport, verify_result

__all__ = [
    "Check",
    "ClientSettings",
    "InferenceClient",
    "NoActiveNodes",
    "RegistryPolicy",
    "RegistryView",
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
