"""Who may call the service, in one place: the bearer token (the JSON API and the console), the Host names the
service answers to, and the same-origin rule of the console's forms.

A service on loopback without a token is open to the local machine, and a browser on that machine is a client
too: a web page whose DNS name is rebound to 127.0.0.1 (DNS rebinding) reaches the service as "its own" site,
so the same-origin policy lets it read the console and post to the API. Such a page still sends its own name in
the Host header, which `HostCheck` refuses; with a token the page cannot authenticate, so any name is answered
unless `allowed_hosts` says otherwise.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy.schemas import ErrorBody


def has_bearer_token(request: Request, token: bytes) -> bool:
    """The request carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def host_name(netloc: str | None) -> str | None:
    """`Example.COM:8000` -> `example.com`, `[::1]:8000` -> `::1`; None for a value that is not a host[:port]."""
    if not netloc or any(c in netloc for c in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    return parts.hostname or None


class HostCheck:
    """Answer only requests whose Host header names one of `allowed_hosts` (any port; `*` is any name,
    `*.example.com` its subdomains); anything else is a 400 before any route runs."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.any = "*" in allowed_hosts
        self.names = {host_name(h) or h.lower() for h in allowed_hosts if not h.startswith("*")}
        self.suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))

    def allows(self, host: str | None) -> bool:
        name = host_name(host)
        return self.any or (name is not None and (name in self.names or name.endswith(self.suffixes)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host")
        if self.allows(host):
            return await self.app(scope, receive, send)
        body = ErrorBody(
            error=f"this service does not answer to the host {host!r}; its allowed_hosts are "
            f"{sorted(self.names) + ['*' + s for s in self.suffixes]}",
            field="host",
        )
        await JSONResponse(body.model_dump(), status_code=400)(scope, receive, send)


def is_same_origin(request: Request) -> bool:
    """A browser's POST came from a page of this service: its Origin (or, without one, its Referer) names the
    host and port the request was sent to. A request with neither (a script, an old browser) passes: the
    CSRF token and the session still guard it."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return True
    if source == "null":  # a sandboxed frame or a redirect across sites: no origin to trust
        return False
    return urlsplit(source).netloc.lower() == request.headers.get("host", "").lower()
