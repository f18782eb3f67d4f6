"""Exact Online: OAuth tokens, paced OData client, and the helpers behind them."""

from expensify_exact.api.exact.auth import ExactAuth, TokenRefresher
from expensify_exact.api.exact.client import ExactClient
from expensify_exact.api.exact.oauth import build_authorize_url, exchange_code, parse_redirect, wait_for_callback
from expensify_exact.api.exact.regions import REGION_BASE_URLS, resolve_base_url, token_url
from expensify_exact.api.exact.tokens import ExactTokens, InMemoryTokenStore, TokenStore

__all__ = [
    "REGION_BASE_URLS",
    "ExactAuth",
    "ExactClient",
    "ExactTokens",
    "InMemoryTokenStore",
    "TokenRefresher",
    "TokenStore",
    "build_authorize_url",
    "exchange_code",
    "parse_redirect",
    "resolve_base_url",
    "token_url",
    "wait_for_callback",
]
