"""The chaos checker judged on made-up evidence: each of its checks catches what it is for,
and an honest record passes. Fast; part of the default run."""

import json
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.chaos import checker
from tests.chaos.checker import Injected, Report, Row
from tests.chaos.harness import PG_FAULTS, Summary, schedule

SLOT = 1_800_000_000
TICKERS = ("btc_usd",)


def served(kind: str, price: str, served_ms: int, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "index": "btc_usd", "price": price, "served_ms": served_ms, **extra}


def row(ts: int, price: str, source: str = "poll", slot: int | None = None, seq: int | None = None) -> Row:
    return Row("btc_usd", ts, Decimal(price), ts if slot is None else slot, source, seq)


def test_rows_that_were_served_pass_and_made_up_ones_are_wrong() -> None:
    record = [
        served("index_price", "100.10", SLOT * 1000 + 200),
        served("ws", "100.20", (SLOT + 1) * 1000 + 5, timestamp=(SLOT + 1) * 1000),
        served("chart", "100.30", (SLOT + 9) * 1000, ts_ms=(SLOT + 2) * 1000),
        served("trade", "100.40", (SLOT + 9) * 1000, ts_ms=(SLOT + 4) * 1000 + 250),
    ]
    report = Report()
    honest = [
        row(SLOT, "100.10"),
        row(SLOT + 1, "100.20", "stream"),
        row(SLOT + 2, "100.30", "backfill"),
        row(SLOT + 4, "100.40", "trade"),
    ]
    checker.check_rows(report, honest, record, TICKERS, 1, [])
    assert report.ok, report.findings

    report = Report()
    made_up = [
        row(SLOT, "100.11"),  # a price never served
        row(SLOT + 30, "100.10"),  # served, but not near this time
        row(SLOT + 1, "100.10", "stream"),  # served by polling, not by the stream
        row(SLOT + 3, "100.30", "backfill"),  # a chart point, at another time
        row(SLOT + 4, "100.41", "trade"),  # a trade's time, another price
        row(SLOT + 4, "100.40", "backfill"),  # a trade's value, claimed as a chart point
    ]
    checker.check_rows(report, made_up, record, TICKERS, 1, [])
    assert report.wrong == 6
    assert {f.check for f in report.findings} == {"not a served value"}


def test_rows_outside_their_slot_or_of_an_unconfigured_ticker_are_found() -> None:
    record = [
        served("index_price", "1", SLOT * 1000),
        {**served("index_price", "1", SLOT * 1000), "index": "x"},
    ]
    report = Report()
    rows = [row(SLOT, "1", slot=SLOT - 5), Row("x", SLOT, Decimal(1), SLOT, "poll", None)]
    checker.check_rows(report, rows, record, TICKERS, 1, [])
    assert sorted(f.check for f in report.findings) == ["outside its slot", "unconfigured ticker"]


def test_slots_missing_duplicated_or_misexplained() -> None:
    outage = Injected("sim_outage", SLOT + 2, SLOT + 3)
    gaps = {
        "btc_usd": [
            {"from_ts": SLOT + 2, "to_ts": SLOT + 2, "reason": "deribit_failed"},  # explained
            {"from_ts": SLOT + 3, "to_ts": SLOT + 3, "reason": "database_unavailable"},  # no such fault
            {"from_ts": SLOT, "to_ts": SLOT, "reason": "late"},  # but the slot has a row
        ]
    }
    rows = [row(SLOT, "1"), row(SLOT + 1, "1"), Row("btc_usd", SLOT + 1, Decimal(2), None, "poll", None)]
    report = Report()
    checker.check_slots(report, rows, gaps, TICKERS, (SLOT, SLOT + 4), 1, [outage])
    assert (report.expected, report.stored, report.duplicated, report.lost) == (5, 2, 1, 2)
    assert report.explained == {"deribit_failed": 1}
    assert sorted(f.check for f in report.findings) == [
        "coverage lists a stored slot",
        "duplicated",
        "lost",  # SLOT + 3: the reason matches no injected fault
        "lost",  # SLOT + 4: not listed at all
    ]


def test_not_repairable_after_a_kill_holds_only_where_the_served_history_skips_the_slot() -> None:
    kill = Injected("kill_serve", SLOT, SLOT + 1)
    gaps = {"btc_usd": [{"from_ts": SLOT, "to_ts": SLOT + 3, "reason": "not_repairable"}]}
    # Points served at SLOT - 1, SLOT + 2.5 and SLOT + 4: none inside SLOT, SLOT + 1 or SLOT + 3;
    # one inside SLOT + 2, which the repair should have filled.
    record = [
        served("chart", "1", (SLOT + 30) * 1000, ts_ms=ts_ms)
        for ts_ms in ((SLOT - 1) * 1000, (SLOT + 2) * 1000 + 500, (SLOT + 4) * 1000)
    ]
    report = Report()
    checker.check_slots(report, [], gaps, TICKERS, (SLOT, SLOT + 3), 1, [kill], record)
    assert report.explained == {"not_repairable": 3}
    assert [(f.check, f.slot_ts) for f in report.findings] == [("lost", SLOT + 2)]
    # Without the record nothing vouches for the verdict.
    unchecked = Report()
    checker.check_slots(unchecked, [], gaps, TICKERS, (SLOT, SLOT + 3), 1, [kill])
    assert unchecked.lost == 4


def test_no_trade_in_slot_after_a_kill_holds_only_where_the_served_trades_skip_the_slot() -> None:
    kill = Injected("kill_serve", SLOT, SLOT + 1)
    gaps = {"btc_usd": [{"from_ts": SLOT, "to_ts": SLOT + 2, "reason": "no_trade_in_slot"}]}
    # Trades served at SLOT - 1, SLOT + 1.5 and SLOT + 3: one inside SLOT + 1, which the
    # repair should have filled; chart points say nothing about trades.
    record = [
        served("trade", "1", (SLOT + 30) * 1000, ts_ms=ts_ms)
        for ts_ms in ((SLOT - 1) * 1000, (SLOT + 1) * 1000 + 500, (SLOT + 3) * 1000)
    ] + [served("chart", "1", (SLOT + 30) * 1000, ts_ms=(SLOT + 1) * 1000)]
    report = Report()
    checker.check_slots(report, [], gaps, TICKERS, (SLOT, SLOT + 2), 1, [kill], record)
    assert report.explained == {"no_trade_in_slot": 2}
    assert [(f.check, f.slot_ts) for f in report.findings] == [("lost", SLOT + 1)]


def test_a_stored_claim_without_its_rows_is_found() -> None:
    report = Report()
    claims = {"tick finished": {SLOT: 1, SLOT + 1: 1}, "task finished": {SLOT: 1}}
    checker.check_log_claims(report, [row(SLOT, "1")], claims, [], 1, [])
    assert [(f.check, f.slot_ts) for f in report.findings] == [("log says stored, no row", SLOT + 1)]


def test_candles_are_recomputed_from_the_rows() -> None:
    rows = [row(SLOT, "3"), row(SLOT + 1, "1", "backfill"), row(SLOT + 2, "2")]
    bucket = SLOT - SLOT % 60
    true = {"ts": bucket, "open": 3, "high": 3, "low": 1, "close": 2, "count": 3, "backfilled": 1}
    report = Report()
    checker.check_candles(report, rows, {("btc_usd", "1m"): [true]}, SLOT + 10)
    assert report.ok
    checker.check_candles(report, rows, {("btc_usd", "1m"): [{**true, "high": Decimal(2)}]}, SLOT + 10)
    assert [f.check for f in report.findings] == ["candles disagree with the rows"]


def test_an_sse_client_that_missed_or_repeated_a_row_is_found() -> None:
    rows = [row(SLOT + n, "1", seq=n + 1) for n in range(4)]
    client = checker.SseClient("http://unused", "sse-test", [1])
    client.received = [(1, "btc_usd", SLOT, Decimal(1)), (3, "btc_usd", SLOT + 2, Decimal(1))] * 2
    report = Report()
    checker.check_sse(report, rows, [client], TICKERS)
    assert sorted(f.check for f in report.findings) == [
        "SSE client missed rows",
        "SSE event twice",
        "SSE event twice",
    ]
    client.received = [(n + 1, "btc_usd", SLOT + n, Decimal(1)) for n in range(3)]
    report = Report()
    checker.check_sse(report, rows, [client], TICKERS)
    assert report.ok  # seq 4 came after the client's last event: not expected of it


def test_the_fault_plan_follows_the_seed() -> None:
    assert schedule(5, PG_FAULTS, 60) == schedule(5, PG_FAULTS, 60)
    assert schedule(5, PG_FAULTS, 60) != schedule(6, PG_FAULTS, 60)
    assert all(0 < fault.at < 60 for fault in schedule(5, PG_FAULTS, 60))


def test_a_failed_run_prints_the_logs_around_its_findings(tmp_path: Path) -> None:
    def line(at: float, event: str) -> str:
        return json.dumps({"event": event, "timestamp": datetime.fromtimestamp(at, UTC).isoformat()})

    worker, beat = tmp_path / "worker.log", tmp_path / "beat.log"
    worker.write_text(
        "\n".join(["a warning, not JSON", line(SLOT - 10, "long before"), line(SLOT + 1.5, "tick")])
    )
    beat.write_text(line(SLOT - 1, "sent") + "\n" + line(SLOT + 20, "long after"))
    report = Report()
    report.add(checker.Finding("lost", "btc_usd", SLOT, "no row"))
    summary = Summary("postgresql", 1, 1.0, Counter(), report, {}, [], [worker, beat, tmp_path / "gone.log"])
    assert [entry.split('"event": ')[1].split(",")[0] for entry in summary.logs_around_findings()] == [
        '"sent"',
        '"tick"',
    ]
    assert summary.logs_around_findings()[0].startswith("beat: ")
