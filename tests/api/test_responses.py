"""How the API's own response classes end."""

import asyncio
import gc
from collections.abc import AsyncGenerator

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from crypto_client.api.responses import ClosingStreamingResponse


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
async def test_a_streamed_body_is_closed_the_moment_its_client_leaves(spec_version: str) -> None:
    closed: list[str] = []

    async def body() -> AsyncGenerator[str, None]:
        try:
            while True:
                yield "row\n"
        finally:
            closed.append("closed")

    left = asyncio.Event()

    async def receive() -> Message:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            left.set()
            raise OSError("the client left")

    response = ClosingStreamingResponse(body(), media_type="text/csv", headers={})
    scope = {"type": "http", "asgi": {"spec_version": spec_version}}
    gc.disable()  # closed by the response, not by a collection that might run meanwhile
    try:
        with pytest.raises((ClientDisconnect, OSError)):
            await response(scope, receive, send)
        assert closed == ["closed"]
    finally:
        gc.enable()
