"""Keyset paging: the opaque cursor and the RFC 8288 `Link` header that carries it."""

import base64
import binascii

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import URL

from crypto_client.domain import MAX_TS


def invalid_parameter(parameter: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", parameter), "msg": message, "type": "value_error"}])


def encode_cursor(ts: int) -> str:
    return base64.urlsafe_b64encode(f"ts:{ts}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The `ts` a cursor points at, or a 422 naming the parameter."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        # isdigit() alone accepts other scripts' digits (Arabic-Indic, ...), which int() reads.
        if prefix != "ts" or not (value.isascii() and value.isdigit()) or int(value) > MAX_TS:
            raise ValueError(cursor)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_parameter(
            "cursor", "not a valid cursor: pass the one from a Link header unchanged"
        ) from None


def next_page_link(request: Request, ticker: str, next_ts: int) -> dict[str, str]:
    """The `Link` header of the page that starts at `next_ts`: this request's query with
    the cursor in place of any offset."""
    query = {k: v for k, v in request.query_params.items() if k not in ("offset", "cursor")}
    query.update(ticker=ticker, cursor=encode_cursor(next_ts))
    next_url = URL(path=request.url.path).include_query_params(**query)
    return {"Link": f'<{next_url}>; rel="next"'}
