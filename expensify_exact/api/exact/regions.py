"""Exact Online's regional hosts (exact-online.md §1): one base URL per country, same paths everywhere."""

from __future__ import annotations

from expensify_exact.errors import ConfigError

# exact-online.md §1; tokens from one host are not expected to work on another.
REGION_BASE_URLS: dict[str, str] = {
    "nl": "https://start.exactonline.nl",
    "be": "https://start.exactonline.be",
    "uk": "https://start.exactonline.co.uk",
    "de": "https://start.exactonline.de",
    "fr": "https://start.exactonline.fr",
    "es": "https://start.exactonline.es",
    "us": "https://start.exactonline.com",
}

_ALIASES: dict[str, str] = {
    "netherlands": "nl", "belgium": "be", "united kingdom": "uk", "gb": "uk", "germany": "de",
    "france": "fr", "spain": "es", "usa": "us", "united states": "us",
}


def resolve_base_url(region: str | None = "nl", base_url: str | None = None) -> str:
    """The base URL to talk to: an explicit `base_url` (sandbox, tests, proxies) wins over the region.

    Args:
        region: a country code (`nl`, `be`, `uk`, `de`, `fr`, `es`, `us`) or name (`Netherlands`, …).
        base_url: an override such as `http://127.0.0.1:8765`.

    Returns:
        The base URL without a trailing slash.

    Raises:
        ConfigError: the region is unknown; the message lists the known ones.
    """
    if base_url:
        return base_url.rstrip("/")
    key = (region or "nl").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in REGION_BASE_URLS:
        known = ", ".join(sorted(REGION_BASE_URLS))
        raise ConfigError(f"unknown Exact Online region {region!r}; use one of: {known}")
    return REGION_BASE_URLS[key]


def token_url(base_url: str) -> str:
    """The OAuth token endpoint for a base URL (exact-online.md §1)."""
    return f"{base_url.rstrip('/')}/api/oauth2/token"


def authorize_endpoint(base_url: str) -> str:
    """The OAuth authorization endpoint for a base URL (exact-online.md §1)."""
    return f"{base_url.rstrip('/')}/api/oauth2/auth"
