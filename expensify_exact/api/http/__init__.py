"""HTTP plumbing shared by both API clients: request pacing and secret redaction."""

from expensify_exact.api.http.client import PacedClient
from expensify_exact.api.http.pacing import (
    ExactRateLimits,
    PacedTransport,
    RateLimitPolicy,
    SlidingWindowLimits,
)
from expensify_exact.api.http.redaction import redact_headers, redact_text, redact_url

__all__ = [
    "ExactRateLimits",
    "PacedClient",
    "PacedTransport",
    "RateLimitPolicy",
    "SlidingWindowLimits",
    "redact_headers",
    "redact_text",
    "redact_url",
]
