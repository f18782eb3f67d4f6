"""Follows Exact's `d.__next` links: one NextLinkPaging object per query, never shared between queries."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from expensify_exact.errors import ApiError

Fetch = Callable[[str, Mapping[str, str] | None], httpx.Response]


class NextLinkPaging:
    """The paging state of one query: where the next page is, if anywhere.

    Picqer keeps `nextUrl` on the connection, so two interleaved queries corrupt each other
    (STYLE.md §4); here each iterator owns its own state.
    """

    def __init__(self, first_url: str, params: Mapping[str, str]):
        self.next_url: str | None = first_url
        self.next_params: dict[str, str] | None = dict(params)
        self.pages = 0
        self._origin: tuple[str, str, int | None] | None = None
        self._seen: set[str] = set()

    @property
    def has_next_page(self) -> bool:
        return self.next_url is not None

    def update(self, response: httpx.Response) -> list[dict[str, Any]]:
        """Take one page: return its rows and remember the `__next` link (exact-online.md §4.2–4.3)."""
        self.pages += 1
        request_url = response.request.url
        if self._origin is None:
            self._origin = (request_url.scheme, request_url.host, request_url.port)
        d = _envelope(response)
        if isinstance(d, list):  # a bare-list envelope has no continuation
            self.next_url = None
            return d
        rows = d.get("results")
        if not isinstance(rows, list):
            # A single entity (`{"d":{…}}`) is one row, never silently dropped.
            self.next_url = None
            return [d]
        link = d.get("__next")
        if not link:
            self.next_url = None
            return rows
        # The documented form is relative ("../api/v1/…", §4.3); real answers are absolute.
        url = request_url.join(link)
        if (url.scheme, url.host, url.port) != self._origin:
            raise ApiError("exact", f"refusing to follow __next to another host ({url.host}): "
                                    "the bearer token would go with it")
        if str(url) in self._seen:
            raise ApiError("exact", "Exact returned the same __next link twice; stopping instead of looping")
        self._seen.add(str(url))
        self.next_url = str(url)
        # The link already carries $select/$filter/$skiptoken: sending the first query's params
        # again would append them a second time (as dlt notes for next-URL paginators).
        self.next_params = None
        return rows


def iter_pages(fetch: Fetch, url: str, params: Mapping[str, str]) -> Iterator[list[dict[str, Any]]]:
    """Yield every page of a collection, following `__next` verbatim to the end.

    A full last page still carries `__next` and the page after it is empty (§4.3): that empty
    page is fetched too, because only its missing `__next` proves the end.

    Args:
        fetch: sends a GET for (url, params) and returns a successful response.
        url: the collection URL (relative to the client's base URL).
        params: the first request's query options ($select, $filter, …).
    """
    paging = NextLinkPaging(url, params)
    while paging.has_next_page:
        response = fetch(paging.next_url, paging.next_params)
        yield paging.update(response)


def _envelope(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError as exc:
        raise ApiError("exact", "expected a JSON OData envelope; got something else "
                                "(was Accept: application/json lost?)", status=response.status_code) from exc
    if not isinstance(body, dict) or "d" not in body:
        raise ApiError("exact", "expected a JSON OData envelope with a 'd' member", status=response.status_code)
    return body["d"]
