"""How the routes answer: JSON bodies with exact decimals, and the OpenAPI entries of the
answers most routes share."""

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Send

from crypto_client import exact_json
from crypto_client.api.schemas import ErrorOut, ValidationErrorOut

OpenApiResponses = dict[int | str, dict[str, Any]]

INVALID: OpenApiResponses = {
    422: {"model": ValidationErrorOut, "description": "A parameter is missing, unknown or invalid."}
}
UNAVAILABLE: OpenApiResponses = {
    503: {
        "model": ErrorOut,
        "description": "The database cannot be reached.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "integer"},
            }
        },
    }
}
UNKNOWN: OpenApiResponses = {
    404: {"model": ErrorOut, "description": "The ticker is neither configured nor stored (see /tickers)."}
}
PAGED: dict[str, Any] = {
    "description": 'Rows oldest first. A `Link: <...>; rel="next"` header is present when more rows follow.',
    "headers": {"Link": {"description": "RFC 8288 link to the next page.", "schema": {"type": "string"}}},
}


def not_found(description: str) -> OpenApiResponses:
    """The 404 entry of a route that also answers it for a missing price (`NoPriceError`)."""
    return {404: {"model": ErrorOut, "description": description}}


class JSONBytes(Response):
    media_type = "application/json"


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONBytes:
    """`payload` as JSON, decimals as exact numbers (`exact_json`)."""
    return JSONBytes(exact_json.dumps(payload), status_code=status_code, headers=headers)


class ClosingStreamingResponse(StreamingResponse):
    """A streamed body whose generator is closed the moment the response ends, however it
    ends. Starlette leaves a generator cut off by a client's leaving to the garbage collector,
    which may run seconds later: until then its read-ahead holds a query and a connection."""

    def __init__(
        self, content: AsyncGenerator[str | bytes, None], *, media_type: str, headers: Mapping[str, str]
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._generator = content

    async def stream_response(self, send: Send) -> None:
        async with aclosing(self._generator):
            await super().stream_response(send)
