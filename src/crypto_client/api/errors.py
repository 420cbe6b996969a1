"""Errors every route answers the same way."""

from fastapi import Request
from starlette.responses import JSONResponse

from crypto_client.config import Settings
from crypto_client.db.repository import PriceReader


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


def unknown_ticker_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownTickerError)
    return JSONResponse({"detail": exc.detail}, status_code=404)


async def require_known(reader: PriceReader, settings: Settings, ticker: str) -> None:
    """`UnknownTickerError` for a ticker neither configured nor stored (nor tracked)."""
    if ticker not in settings.tickers and not await reader.is_known(ticker):
        raise UnknownTickerError(ticker)
