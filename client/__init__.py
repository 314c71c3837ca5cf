"""Client library for producers: build requests, send them, await replies that verify."""

from client.requests import build_request, new_request_id, parse_payload
from client.settings import ClientSettings
from client.streaming import check_stream, reassemble
from client.transport import InferenceClient, NoActiveNodes, ReplyReaderStopped, ReplyTimeout
from client.trust import ClientTrust, TrustUnavailable
from schemas.sealing import SealedReplyError, SealedRequest, seal_request
from schemas.verify.result import Check, Trust, VerificationReport, verify_result

__all__ = [
    "Check",
    "ClientSettings",
    "ClientTrust",
    "InferenceClient",
    "NoActiveNodes",
    "ReplyReaderStopped",
    "ReplyTimeout",
    "SealedReplyError",
    "SealedRequest",
    "Trust",
    "TrustUnavailable",
    "VerificationReport",
    "build_request",
    "check_stream",
    "new_request_id",
    "parse_payload",
    "reassemble",
    "seal_request",
    "verify_result",
]
