"""What ingestion needs from a price source, whatever its transport or exchange.

A polled source implements `PolledSource` (current prices, its own history, who it is), a
stream implements `StreamingSource`; `clients/factory.py` builds the configured ones, and
ingestion never imports a concrete client.
"""

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from crypto_client.origin import OriginSource


@dataclass(frozen=True, slots=True)
class Observation:
    """One price as the source reported it, with both clocks that saw it.

    `server_time_us` is the source's own clock (Deribit's `usOut`), unchecked: ingestion
    decides whether to believe it. `sent_at` and `received_at` are the local wall-clock
    times (UNIX seconds) of the request and of its answer.
    """

    ticker: str
    price: Decimal
    server_time_us: int | None
    sent_at: float
    received_at: float


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome for one ticker: an observation, or why there is none."""

    ticker: str
    observation: Observation | None = None
    error: Exception | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """A point of the source's own history: its time (milliseconds) and price."""

    ts_ms: int
    price: Decimal


class HistorySource(Protocol):
    @property
    def history_ranges(self) -> Mapping[str, int | None]:
        """The source's history ranges, finest first, with how far back each reaches
        (seconds; None: everything)."""
        ...

    async def fetch_history(self, ticker: str, range_name: str) -> list[HistoryPoint]:
        """The source's history of `ticker` over one of its ranges, oldest first."""
        ...


class DeadlinePassedError(Exception):
    """The source had not answered by the caller's deadline, and was no longer waited for."""


class PriceSource(Protocol):
    async def fetch_prices(
        self, tickers: Sequence[str], *, deadline: float | None = None
    ) -> list[FetchResult]:
        """The current price of every ticker; one ticker's failure is its own result.

        A ticker not answered by `deadline` (UNIX seconds) is not waited for, retries and all:
        its result's error is `DeadlinePassedError`."""
        ...

    async def aclose(self) -> None: ...


class PolledSource(PriceSource, HistorySource, OriginSource, Protocol):
    """A source asked for its prices once per slot, which can also tell its history."""


OnObservation = Callable[[Observation], Awaitable[None]]


class StreamingSource(OriginSource, Protocol):
    """A source that pushes its prices: one connection, made again whenever it drops."""

    @property
    def connected(self) -> asyncio.Event:
        """Set while a connection is up and subscribed."""
        ...

    @property
    def reconnects(self) -> int: ...

    @property
    def prices(self) -> int:
        """Prices delivered so far, over every connection."""
        ...

    async def run(self, tickers: Sequence[str], on_observation: OnObservation) -> None:
        """Deliver the prices of `tickers` to `on_observation` until cancelled; an error other
        than the connection's own ends it (the runner starts a new source)."""
        ...
