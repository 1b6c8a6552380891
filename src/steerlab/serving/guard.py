"""The server's front door: Host and Origin allow-lists, the API key, JSON-only bodies.

:class:`Guard` is plain ASGI middleware, so it answers before FastAPI parses anything.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from steerlab.serving.service import ApiError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("steerlab.serving")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Security:
    """Who may use the server.

    Attributes:
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <key>``.
        allowed_hosts: ``Host`` header names accepted (``*`` accepts any); loopback names
            by default, which defeats DNS rebinding.
        expose_metadata: ``/v1/vectors`` shows full metadata (dataset paths, notes).
        allowed_origins: browser origins (``scheme://host:port``, or ``null``) accepted
            besides the server's own; an ``Origin`` is compared with scheme, host and port.
    """

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    expose_metadata: bool = False
    allowed_origins: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name stays on this machine."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an ``Origin`` value (ports filled in), or None when it is
    not an http(s) origin."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS or not rest or "/" in rest:
        return None
    return _authority(scheme, rest)


def _authority(scheme: str, value: str) -> tuple[str, str, int] | None:
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        if end < 0:
            return None
        host, tail = value[1:end], value[end + 1 :]
        port_text = tail[1:] if tail.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, ""
    if port_text and not port_text.isdigit():
        return None
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    return scheme, host, port


def _host_name(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class Guard:
    """ASGI middleware: Host/Origin allow-list, API key, JSON-only bodies, body size."""

    app: Any
    security: Security
    max_body_bytes: int
    _hosts: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self._hosts = frozenset(h.lower() for h in self.security.allowed_hosts)
        self._origins = {o if o == "null" else origin_key(o) for o in self.security.allowed_origins}

    def _allowed(self, name: str) -> bool:
        return "*" in self._hosts or name in self._hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        scope["steerlab_request_id"] = rid
        started = False

        async def tagged(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(scope, headers)
        if problem is not None:
            await _send_error(tagged, problem)
            return
        try:
            await self.app(scope, receive, tagged)
        except Exception as exc:  # a bug: one log line and a JSON 500, never a traceback
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            log.error("request %s failed: %s: %s", rid, type(exc).__name__, text)
            if not started:
                await _send_error(
                    tagged,
                    ApiError(
                        500,
                        f"internal error (request {rid}): the server logged it",
                        kind="server_error",
                    ),
                )

    def _same_origin(self, origin: str, scope: Scope, headers: dict[str, str]) -> bool:
        """The page's origin is this server (scheme, host and port), or allowed by name."""
        if origin.strip() == "null":
            return "null" in self._origins
        key = origin_key(origin)
        if key is None:
            return False
        if key in self._origins:
            return True
        scheme = str(scope.get("scheme", "http"))
        own = _authority(
            scheme if scheme in _DEFAULT_PORTS else "http", headers.get("host", "").lower()
        )
        return own is not None and key == own and self._allowed(key[1])

    def _check(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        if not self._allowed(_host_name(headers.get("host", ""))):
            return ApiError(
                421,
                "this server does not answer for that Host name: start it with --allow-host",
                kind="invalid_request_error",
            )
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, scope, headers):
            return ApiError(
                403,
                "cross-origin requests are not allowed: start the server with --allow-origin "
                "for this origin",
                kind="forbidden",
            )
        path = str(scope.get("path", ""))
        key = self.security.api_key
        if key and path.startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    kind="authentication_error",
                )
        if scope.get("method") == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return ApiError(
                    415, "the request body must be JSON (Content-Type: application/json)"
                )
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return ApiError(
                    413,
                    f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                )
        return None


async def _send_error(send: Send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
