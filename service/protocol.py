"""uvicorn's HTTP protocol (httptools) with a deadline on each request's headers.

uvicorn closes idle keep-alive connections, but a client that opens a connection and then sends its
request line and headers a byte at a time (slowloris) keeps a socket and a parser for as long as it
trickles, and a connection that sends nothing at all is never closed. Here every request gets
`header_timeout_s` from its first byte (from the connection's opening, for the first request) to the
end of its headers; past that the client gets 408 and the connection is closed. The body has its
own deadline inside the app (DEDE_BODY_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_BODY = json.dumps(
    {
        "error": {
            "code": "request_timeout",
            "message": "the request's headers did not arrive in time (DEDE_HEADER_TIMEOUT_S)",
        }
    }
).encode()
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """Use `header_deadline_protocol` to get one with its timeout and counter set."""

    header_timeout_s: float = 10.0
    on_timeout: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:  # a later request on a kept-alive connection
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.on_timeout is not None:
            self.on_timeout()
        self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()


def header_deadline_protocol(
    header_timeout_s: float, on_timeout: Callable[[], None] | None = None
) -> type[HeaderDeadlineProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with this deadline and timeout counter."""
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "on_timeout": staticmethod(on_timeout) if on_timeout else None,
        },
    )
