"""Errors every route answers the same way: a ticker nobody knows, and a price that is not
there (both 404, with a message saying which)."""

from fastapi import Request
from starlette.responses import JSONResponse

from crypto_client.config import Settings
from crypto_client.db.reader import PriceReader


class UnknownTickerError(Exception):
    """A ticker neither configured nor stored: a typo must not look like "no data yet"."""

    def __init__(self, ticker: str) -> None:
        super().__init__(ticker)
        self.ticker = ticker

    @property
    def detail(self) -> str:
        return (
            f"unknown ticker {self.ticker!r}: it is neither configured nor stored;"
            " GET /tickers lists the known ones"
        )


class NoPriceError(Exception):
    """A known ticker without the price asked for: none yet, none at or before a moment, or
    only one older than the caller accepts."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @classmethod
    def yet(cls, ticker: str) -> "NoPriceError":
        return cls(f"no price stored for ticker {ticker!r} yet")

    @classmethod
    def at(cls, ticker: str, ts: int) -> "NoPriceError":
        return cls(f"no price of {ticker!r} at or before ts={ts}")

    @classmethod
    def too_old(cls, ticker: str, ts: int, found_ts: int, max_age_seconds: int) -> "NoPriceError":
        return cls(
            f"the last price of {ticker!r} at or before ts={ts} is {ts - found_ts} s old"
            f" (ts={found_ts}), more than max_age_seconds={max_age_seconds}"
        )


async def require_known(reader: PriceReader, settings: Settings, ticker: str) -> None:
    """`UnknownTickerError` for a ticker neither configured nor stored (nor tracked)."""
    if ticker not in settings.tickers and not await reader.is_known(ticker):
        raise UnknownTickerError(ticker)


def not_found_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownTickerError | NoPriceError)
    return JSONResponse({"detail": exc.detail}, status_code=404)
