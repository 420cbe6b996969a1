"""Caps on the long responses one API process serves at once: live streams and exports.

A stream holds a connection, a task and a place in the feed for as long as its client stays;
an export holds database connections batch after batch. Past a cap, a client gets a 503 with
`Retry-After` at once, instead of every client (and `/livez`) getting slower.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, HTTPException, Request

RETRY_AFTER_SECONDS = 5


class ConcurrencyCap:
    def __init__(self, what: str, limit: int, setting: str) -> None:
        self.what = what
        self.limit = limit
        self.setting = setting
        self.held = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Held from the request's start until its response has been sent (or abandoned)."""
        if self.held >= self.limit:
            raise HTTPException(
                503,
                detail=f"{self.limit} {self.what} are already open on this server ({self.setting}); "
                f"try again in {RETRY_AFTER_SECONDS} s",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


async def _stream_slot(request: Request) -> AsyncIterator[None]:
    cap: ConcurrencyCap = request.app.state.stream_cap
    async with cap.slot():
        yield


async def _export_slot(request: Request) -> AsyncIterator[None]:
    cap: ConcurrencyCap = request.app.state.export_cap
    async with cap.slot():
        yield


# Scope "request": the slot is released after the (streamed) response, not before it.
StreamSlot = Depends(_stream_slot, scope="request")
ExportSlot = Depends(_export_slot, scope="request")
