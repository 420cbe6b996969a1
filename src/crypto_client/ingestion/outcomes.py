"""What happened to one ticker's price: stored, a duplicate of its slot's row, or failed and why.

Every source's prices (polled or streamed) end in one of these, and each is counted in
`crypto_client_ingest_outcomes_total`.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from crypto_client import metrics
from crypto_client.domain import GapReason, Source

Status = Literal["stored", "duplicate", "failed"]


@dataclass(frozen=True, slots=True)
class TickerOutcome:
    ticker: str
    status: Status
    price: Decimal | None = None
    ts: int | None = None
    error: str | None = None
    reason: GapReason | None = None


def count_outcomes(source: Source, outcomes: Iterable[TickerOutcome]) -> None:
    for outcome in outcomes:
        metrics.INGEST_OUTCOMES.labels(
            source, metrics.ticker_label(outcome.ticker), outcome.status, outcome.reason or ""
        ).inc()
