"""Connection limits the ASGI layer cannot see: a cap on open connections and a deadline
for each request's head (its request line and headers).

:func:`protocol` makes a subclass of uvicorn's h11 protocol: a connection beyond the cap is
answered 503 and closed at once (before it holds a file descriptor for long), and one that
has not sent a complete request head within ``header_timeout`` seconds of connecting (or of
its previous response) is answered 408 and closed, so silent or trickling clients cannot
pile up. The body and the request's own deadline are the app's (``serving/app.py``), counted
from the moment the head is complete.
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any


def default_max_connections() -> int:
    """Half this process's file-descriptor limit (at most 1024): room for the model's files,
    logs and the connections that are refused."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 4096
    return max(8, min(1024, soft // 2))


def _response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return (head + "\r\n").encode() + body


def protocol(max_connections: int, header_timeout: float) -> type:
    """A uvicorn HTTP protocol class with these limits (``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Limited(H11Protocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._steerlab_cycle: Any = None
            self._steerlab_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.write(
                    _response(
                        503,
                        "Service Unavailable",
                        f"the server holds its limit of {max_connections} connections: "
                        "retry shortly",
                    )
                )
                transport.close()
                return
            self._steerlab_arm()

        def _steerlab_arm(self) -> None:
            self._steerlab_disarm()
            self._steerlab_timer = self.loop.call_later(header_timeout, self._steerlab_expire)

        def _steerlab_disarm(self) -> None:
            if self._steerlab_timer is not None:
                self._steerlab_timer.cancel()
                self._steerlab_timer = None

        def _steerlab_expire(self) -> None:
            if not self.transport.is_closing():
                self.transport.write(
                    _response(
                        408,
                        "Request Timeout",
                        f"no complete request head within {header_timeout:g} s",
                    )
                )
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._steerlab_cycle:
                self._steerlab_cycle = self.cycle  # a new request's head is complete
                self._steerlab_disarm()

        def on_response_complete(self) -> None:
            # The next request on this connection gets its own deadline; armed first, so a
            # pipelined request that super() starts at once disarms it again.
            if not self.transport.is_closing():
                self._steerlab_arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._steerlab_disarm()
            super().connection_lost(exc)

    return Limited
