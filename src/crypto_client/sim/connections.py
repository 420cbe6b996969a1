"""Deribit's cap of simultaneous connections per IP, counted where Deribit counts it: open TCP
connections, idle keep-alive ones and WebSockets included, not requests in flight.

The count follows the transports themselves, so a connection upgraded to a WebSocket (its
protocol object replaced by uvicorn) is still counted until it closes.
"""

import asyncio
from collections.abc import Callable
from typing import Any

# What Deribit sends the connection over the cap: a status line and nothing else.
REFUSAL = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ConnectionCount:
    def __init__(self) -> None:
        self._open: set[asyncio.BaseTransport] = set()
        self.max_open = 0
        self.refused = 0

    @property
    def open(self) -> int:
        self._open = {transport for transport in self._open if not transport.is_closing()}
        return len(self._open)

    def admit(self, transport: asyncio.BaseTransport, limit: int | None) -> bool:
        """Count `transport` in, or refuse it when `limit` connections are already open."""
        if limit is not None and self.open >= limit:
            self.refused += 1
            return False
        self._open.add(transport)
        self.max_open = max(self.max_open, self.open)
        return True

    def reset(self) -> None:
        self.max_open = self.open
        self.refused = 0


def capped_protocol(
    base: type[asyncio.Protocol], count: ConnectionCount, limit: Callable[[], int | None]
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol), answering a connection beyond `limit()` with a bare
    HTTP 429 and closing it, as Deribit does."""

    class Capped(base):  # type: ignore[valid-type, misc]
        _refused = False

        def connection_made(self, transport: Any) -> None:
            if count.admit(transport, limit()):
                super().connection_made(transport)
                return
            self._refused = True
            self._refused_transport = transport

        def data_received(self, data: bytes) -> None:
            if self._refused:
                # Read the request first: closing with it unread would reset the connection.
                self._refused_transport.write(REFUSAL)
                self._refused_transport.close()
                return
            super().data_received(data)

        def eof_received(self) -> bool | None:
            if self._refused:
                return None
            result: bool | None = super().eof_received()
            return result

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._refused:
                super().connection_lost(exc)

    return Capped
