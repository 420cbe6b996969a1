"""Every Prometheus metric of the service, defined once, and how each process kind shows them.

- API processes serve `/metrics`. `crypto-client api` points `PROMETHEUS_MULTIPROC_DIR` at a
  fresh directory before its workers start (see `cli/common.py`: it must happen before this module
  is imported), so any worker answers for all of them.
- The Celery worker (its pool processes write to a multiprocess directory the same way), the
  beat and the stream consumer serve their own on `METRICS_PORT`.
- Figures about the data itself (newest price, its time, coverage of the last 24 h) are read
  from the database when `/metrics` is scraped, so they are right whichever process wrote.

Labels stay bounded: a ticker outside `TICKERS` is counted as `other`, routes are templates.
"""

import os
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # also in cli/common.py, which must not import this
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUEST_DURATION = Histogram(
    "crypto_client_http_request_duration_seconds",
    "API request duration, by route template and status.",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
INGEST_OUTCOMES = Counter(
    "crypto_client_ingest_outcomes_total",
    "Ingested prices per ticker by source and outcome (stored, duplicate, failed with its reason).",
    ["source", "ticker", "status", "reason"],
)
DERIBIT_REQUEST_DURATION = Histogram(
    "crypto_client_deribit_request_duration_seconds",
    "Deribit HTTP request duration per JSON-RPC method and outcome (ok, transient, rate_limited, permanent).",
    ["method", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
DERIBIT_RETRIES = Counter(
    "crypto_client_deribit_retries_total",
    "Deribit calls retried, by method and the outcome that caused the retry.",
    ["method", "outcome"],
)
DATABASE_WRITE_DURATION = Histogram(
    "crypto_client_database_write_duration_seconds",
    "Duration of write transactions (prices, roll-up, ledger), commit included.",
    buckets=_LATENCY_BUCKETS,
)
STREAM_CONNECTED = Gauge(
    "crypto_client_stream_connected",
    "1 while the WebSocket price stream is connected and subscribed.",
    multiprocess_mode="livemax",
)
STREAM_RECONNECTS = Counter("crypto_client_stream_reconnects_total", "WebSocket stream reconnections.")
STREAM_RESTARTS = Counter(
    "crypto_client_stream_restarts_total", "Stream consumers restarted by their runner after a crash."
)
STREAM_MESSAGES = Counter(
    "crypto_client_stream_messages_total",
    "WebSocket messages received, by kind (price, heartbeat, answer; skipped: malformed, unsubscribed).",
    ["kind"],
)
BACKFILLED_ROWS = Counter(
    "crypto_client_backfilled_rows_total",
    "Rows stored from Deribit's history to fill missing slots.",
    ["ticker"],
)

_tickers: frozenset[str] = frozenset()


def set_tickers(tickers: Iterable[str]) -> None:
    """The tickers that get labels of their own (`TICKERS`); any other is `other`."""
    global _tickers
    _tickers = frozenset(tickers)


def ticker_label(ticker: str) -> str:
    return ticker if ticker in _tickers else "other"


def _registry() -> CollectorRegistry:
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def mark_process_dead(pid: int) -> None:
    """A pool process ended: its live gauges no longer count."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve_on_port(port: int) -> None:
    """Serve this process's metrics (and its pool's, in multiprocess mode) on `port`."""
    if port:
        start_http_server(port, registry=_registry())


class _Computed:
    """A collector of metric families computed before the scrape (async database reads)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: Sequence[Metric] = ()) -> bytes:
    """The text exposition of this process (or all of its kind) plus `families`."""
    computed = CollectorRegistry()
    computed.register(_Computed(families))
    return generate_latest(_registry()) + generate_latest(computed)


def data_families(
    newest: dict[str, tuple[float, int]], coverage: dict[str, float | None]
) -> list[GaugeMetricFamily]:
    """Gauges about the stored data: per ticker its newest price and time, and coverage."""
    price = GaugeMetricFamily(
        "crypto_client_latest_price", "The newest stored price of each configured ticker.", labels=["ticker"]
    )
    newest_ts = GaugeMetricFamily(
        "crypto_client_newest_price_timestamp_seconds",
        "UNIX time of the newest stored price of each configured ticker (freshness: time() minus it).",
        labels=["ticker"],
    )
    for ticker, (value, ts) in sorted(newest.items()):
        price.add_metric([ticker], value)
        newest_ts.add_metric([ticker], ts)
    covered = GaugeMetricFamily(
        "crypto_client_coverage_ratio",
        "Stored slots over expected slots of each configured ticker over the last 24 hours.",
        labels=["ticker"],
    )
    for ticker, ratio in sorted(coverage.items()):
        if ratio is not None:
            covered.add_metric([ticker], ratio)
    return [price, newest_ts, covered]
