"""Chat alerts through an incoming webhook: Slack (`{"text": ...}`) or Microsoft Teams (a MessageCard)."""

from __future__ import annotations

import httpx

from expensify_exact.notify import NotificationError


def chat_payload(fmt: str, title: str, text: str) -> dict:
    """The JSON body an incoming webhook of `fmt` ("slack" or "teams") accepts."""
    if fmt == "slack":
        return {"text": f"*{title}*\n{text}"}
    if fmt == "teams":
        return {"@type": "MessageCard", "@context": "https://schema.org/extensions", "summary": title,
                "title": title, "text": text.replace("\n", "\n\n")}  # Teams' card Markdown needs blank lines
    raise ValueError(f"unknown webhook format {fmt!r}; use slack or teams")


def post_chat(url: str, payload: dict, *, timeout: float = 15.0, transport: httpx.BaseTransport | None = None) -> None:
    """POST the payload; raise NotificationError on anything but a 2xx. The URL (a secret) is never in a message.

    Sent through a transport rather than an `httpx.Client`, whose logger writes every request's URL at INFO.
    """
    request = httpx.Request("POST", url, json=payload, extensions={"timeout": httpx.Timeout(timeout).as_dict()})
    own = transport is None
    transport = transport or httpx.HTTPTransport()
    try:
        response = transport.handle_request(request)
        response.read()
    except httpx.HTTPError as exc:
        raise NotificationError(f"the alert webhook could not be reached: {type(exc).__name__}") from None
    finally:
        if own:
            transport.close()
    if not response.is_success:
        raise NotificationError(f"the alert webhook answered HTTP {response.status_code}: "
                                f"{response.text[:200].strip()}")
