"""What every router answers the same way: the JSON body type and the documented error responses."""

from typing import Any

from fastapi import Response

from crypto_client.api.schemas import ErrorOut, ValidationErrorOut


class JSONBytes(Response):
    media_type = "application/json"


INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorOut, "description": "A parameter is missing, unknown or invalid."}
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "The database cannot be reached."}
}
UNKNOWN: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "The ticker is neither configured nor stored (see /tickers)."}
}
PAGED: dict[str, Any] = {
    "description": 'Rows oldest first. A `Link: <...>; rel="next"` header is present when more rows follow.',
    "headers": {"Link": {"description": "RFC 8288 link to the next page.", "schema": {"type": "string"}}},
}
