"""The chaos run's judge. It trusts nothing the service says about itself: it reads the
database with its own driver (asyncpg, sqlite3), the simulator's record of what it served
(`GET /_sim/served`), and SSE streams it opened itself. The service's logs and `/coverage` are
read only to check that they tell the truth.

It deliberately imports nothing of `crypto_client`: a bug in the service's own rules (slots,
prices, sources) must not be able to hide here by being shared.
"""

import asyncio
import json
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

# How far (seconds) a stored poll or stream `ts` may be from the moment the simulator served
# its price: the row's `ts` is Deribit's usOut or the local receive time, both within the
# request's round trip, truncated to the second.
SERVED_TOLERANCE_SECONDS = 2.0
# A fault explains a missing slot from this long before it began to this long after it ended:
# a retried request, a redelivered task or a restarted process needs some seconds to recover.
EXPLAIN_BEFORE_SECONDS = 3.0
EXPLAIN_AFTER_SECONDS = 20.0

# Which injected faults can cause each reason `/coverage` gives for a missing slot. `late`
# can follow any fault that slows a tick down; a slot missing with no fault near it is lost.
REASON_CAUSES: dict[str, frozenset[str]] = {
    "deribit_failed": frozenset({"sim_outage", "sim_rate_limit", "sim_garbage", "sim_bad_result"}),
    "invalid_value": frozenset({"sim_bad_result", "sim_garbage", "ws_hostile", "sim_bad_chart"}),
    "late": frozenset({"*"}),
    "clock_skew": frozenset({"sim_clock_lie", "kill_beat", "kill_worker", "redis_restart", "kill_serve"}),
    "database_unavailable": frozenset(
        {
            "pg_restart",
            "proxy_cut_commit_before",
            "proxy_cut_commit_after",
            "proxy_cut_mid_query",
            "proxy_cut_all",
            "proxy_latency",
            "disk_full",
        }
    ),
    "not_repairable": frozenset({"sim_bad_chart", "sim_empty_chart", "sim_outage", "sim_rate_limit"}),
    "no_tick_ran": frozenset(
        {
            "kill_worker",
            "kill_beat",
            "redis_restart",
            "kill_serve",
            "pg_restart",
            "disk_full",
            "proxy_cut_all",
        }
    ),
}


@dataclass(frozen=True)
class Row:
    ticker: str
    ts: int
    price: Decimal
    slot_ts: int | None
    source: str
    seq: int | None


@dataclass(frozen=True)
class Injected:
    """A fault as the harness injected it: from `started` to `ended` (UNIX seconds)."""

    kind: str
    started: float
    ended: float
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """One broken promise, with what the checker saw."""

    check: str
    ticker: str | None
    slot_ts: int | None
    evidence: str
    faults_near: tuple[str, ...] = ()

    def line(self) -> str:
        where = " ".join(
            part
            for part in (self.ticker, f"slot {self.slot_ts}" if self.slot_ts is not None else None)
            if part is not None
        )
        near = f" (faults near: {', '.join(self.faults_near)})" if self.faults_near else " (no fault near)"
        return f"[{self.check}] {where or '-'}: {self.evidence}{near}"


@dataclass
class Report:
    expected: int = 0
    stored: int = 0
    explained: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)


# Reading what is really there -------------------------------------------------------------


async def _pg_rows(dsn: str) -> list[Row]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        records = await connection.fetch(
            "SELECT ticker, ts, price::text AS price, slot_ts, source, seq FROM price_ticks"
        )
    finally:
        await connection.close()
    return [
        Row(r["ticker"], r["ts"], Decimal(r["price"]), r["slot_ts"], r["source"], r["seq"]) for r in records
    ]


def _sqlite_rows(path: Path) -> list[Row]:
    # Read-only and through the URI: the checker must never create or change the file.
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as connection:
        cursor = connection.execute(
            "SELECT ticker, ts, CAST(price AS TEXT), slot_ts, source, seq FROM price_ticks"
        )
        return [Row(t, ts, Decimal(p), slot, source, seq) for t, ts, p, slot, source, seq in cursor]


def read_rows(database: str) -> list[Row]:
    """Every row of `price_ticks`: `database` is a plain PostgreSQL DSN or a SQLite file path."""
    if database.startswith("postgresql://"):
        return asyncio.run(_pg_rows(database))
    return _sqlite_rows(Path(database))


def read_served(sim_url: str) -> list[dict[str, Any]]:
    """The simulator's whole record of what it served, oldest first."""
    served: list[dict[str, Any]] = []
    position = 0
    with httpx.Client(timeout=30) as client:
        while True:
            page = client.get(f"{sim_url}/_sim/served", params={"after": position, "limit": 100_000}).json()
            served.extend(page["served"])
            if page["next"] >= page["total"]:
                return served
            position = page["next"]


def _decimals(response: httpx.Response) -> Any:
    response.raise_for_status()
    return json.loads(response.text, parse_float=Decimal, parse_int=Decimal)


def read_coverage(api_url: str, ticker: str, from_ts: int, to_ts: int) -> list[dict[str, Any]]:
    gaps: list[dict[str, Any]] = []
    url: str | None = f"{api_url}/coverage"
    params: dict[str, Any] | None = {"ticker": ticker, "from_ts": from_ts, "to_ts": to_ts, "limit": 1000}
    with httpx.Client(timeout=30) as client:
        while url is not None:
            response = client.get(url, params=params)
            response.raise_for_status()
            gaps.extend(response.json()["gaps"])
            url = response.links.get("next", {}).get("url")
            params = None
    return gaps


def read_candles(api_url: str, ticker: str, interval: str, from_ts: int, to_ts: int) -> list[dict[str, Any]]:
    candles: list[dict[str, Any]] = []
    url: str | None = f"{api_url}/prices/candles"
    params: dict[str, Any] | None = {
        "ticker": ticker,
        "interval": interval,
        "from_ts": from_ts,
        "to_ts": to_ts,
        "limit": 1000,
    }
    with httpx.Client(timeout=30) as client:
        while url is not None:
            response = client.get(url, params=params)
            candles.extend(_decimals(response))
            url = response.links.get("next", {}).get("url")
            params = None
    return candles


# Log lines that report how many rows of a slot a tick stored: the tick's own line and the
# Celery task's result line.
STORED_CLAIMS = ("tick finished", "task finished")


def log_claims(log_paths: Iterable[Path]) -> tuple[dict[str, Counter[int]], list[dict[str, Any]]]:
    """What the service's JSON logs say it did: `stored` per slot from each line of
    `STORED_CLAIMS`, and the rows it says it lost (`tick lost`)."""
    stored: dict[str, Counter[int]] = {event: Counter() for event in STORED_CLAIMS}
    lost: list[dict[str, Any]] = []
    for path in log_paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            event = entry.get("event")
            if event in stored and isinstance(entry.get("slot_ts"), int):
                stored[event][entry["slot_ts"]] += int(entry.get("stored", 0))
            elif isinstance(event, str) and event.startswith("tick lost"):
                lost.extend(entry.get("rows", []))
    return stored, lost


# SSE clients that leave and come back ----------------------------------------------------


class SseClient(threading.Thread):
    """Follows `/prices/stream` from the very first row (`Last-Event-ID: 0`), leaving after a
    random number of events and resuming from the last id it got, as a browser does; a lost
    connection (the API killed) is resumed the same way."""

    def __init__(self, api_url: str, name: str, leave_after: Sequence[int]) -> None:
        super().__init__(name=name, daemon=True)
        self.api_url = api_url
        self.leave_after = list(leave_after)
        self.received: list[tuple[int, str, int, Decimal]] = []
        self.resumes = 0
        self.errors: Counter[str] = Counter()
        self._leaving = threading.Event()

    @property
    def last_id(self) -> int:
        return self.received[-1][0] if self.received else 0

    def stop(self) -> None:
        self._leaving.set()

    def run(self) -> None:
        session = 0
        while not self._leaving.is_set():
            budget = self.leave_after[session % len(self.leave_after)]
            session += 1
            try:
                self._session(budget)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.errors[type(exc).__name__] += 1
                self._leaving.wait(0.5)
            self.resumes += 1

    def _session(self, budget: int) -> None:
        headers = {"Last-Event-ID": str(self.last_id), "Accept": "text/event-stream"}
        timeout = httpx.Timeout(10, read=5)
        with httpx.stream(
            "GET", f"{self.api_url}/prices/stream", headers=headers, timeout=timeout
        ) as response:
            if response.status_code != 200:
                self.errors[f"HTTP {response.status_code}"] += 1
                self._leaving.wait(0.5)
                return
            for event in _events(response.iter_lines()):
                if event.get("event") != "price":
                    continue
                data = json.loads(event["data"], parse_float=Decimal, parse_int=Decimal)
                self.received.append(
                    (int(event["id"]), data["ticker"], int(data["ts"]), Decimal(data["price"]))
                )
                budget -= 1
                if budget <= 0 or self._leaving.is_set():
                    return


def _events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


# The checks --------------------------------------------------------------------------------


def _faults_near(injected: Sequence[Injected], slot: int, interval: int) -> list[Injected]:
    return [
        f
        for f in injected
        if f.started - EXPLAIN_BEFORE_SECONDS <= slot + interval and slot <= f.ended + EXPLAIN_AFTER_SECONDS
    ]


def _explains(reason: str, near: Sequence[Injected]) -> bool:
    causes = REASON_CAUSES.get(reason, frozenset())
    return any("*" in causes or f.kind in causes for f in near)


class _ServedIndex:
    """The simulator's record keyed by (index, price, kind): the moments each was served."""

    def __init__(self, served: Iterable[Mapping[str, Any]]) -> None:
        self.moments: dict[tuple[str, Decimal, str], list[float]] = defaultdict(list)
        # History served (chart points, trades' index prices): (kind, index, second, price).
        self.history: set[tuple[str, str, int, Decimal]] = set()
        for record in served:
            price = Decimal(record["price"])
            if record["kind"] in _HISTORY_KINDS:
                self.history.add((record["kind"], record["index"], int(record["ts_ms"]) // 1000, price))
            else:
                self.moments[(record["index"], price, record["kind"])].append(record["served_ms"] / 1000)
        for moments in self.moments.values():
            moments.sort()

    def served_near(self, ticker: str, price: Decimal, kind: str, ts: int) -> bool:
        moments = self.moments.get((ticker, price, kind), [])
        first = bisect_left(moments, ts - SERVED_TOLERANCE_SECONDS)
        return first < len(moments) and moments[first] <= ts + 1 + SERVED_TOLERANCE_SECONDS


_SERVED_AS = {"poll": "index_price", "stream": "ws"}
# A back-filled row's source, and the kind of history it was filled from.
_HISTORY_KINDS = {"chart": "backfill", "trade": "trade"}
_FILLED_FROM = {source: kind for kind, source in _HISTORY_KINDS.items()}


def check_rows(
    report: Report,
    rows: Sequence[Row],
    served: Iterable[Mapping[str, Any]],
    tickers: Sequence[str],
    interval: int,
    injected: Sequence[Injected],
) -> None:
    """Every row is the simulator's exact value for its time and source, inside its slot,
    for a configured ticker."""
    index = _ServedIndex(served)
    for row in rows:
        slot = row.slot_ts if row.slot_ts is not None else row.ts // interval * interval
        near = tuple(sorted({f.kind for f in _faults_near(injected, slot, interval)}))
        if row.ticker not in tickers:
            report.add(Finding("unconfigured ticker", row.ticker, slot, f"row {row}", near))
        if row.slot_ts is not None and not row.slot_ts <= row.ts < row.slot_ts + interval:
            report.add(Finding("outside its slot", row.ticker, slot, f"ts {row.ts} in row {row}", near))
        if row.source in _FILLED_FROM:
            genuine = (_FILLED_FROM[row.source], row.ticker, row.ts, row.price) in index.history
        elif row.source in _SERVED_AS:
            genuine = index.served_near(row.ticker, row.price, _SERVED_AS[row.source], row.ts)
        else:
            genuine = False
        if not genuine:
            report.wrong += 1
            report.add(
                Finding(
                    "not a served value", row.ticker, slot, f"{row.source} row {row} was never served", near
                )
            )


def _served_history_times(served: Iterable[Mapping[str, Any]], kind: str) -> dict[str, list[int]]:
    """The times (seconds) of every history point of `kind` (chart or trade) the simulator
    served, per index, sorted."""
    times: dict[str, set[int]] = defaultdict(set)
    for record in served:
        if record["kind"] == kind:
            times[record["index"]].add(int(record["ts_ms"]) // 1000)
    return {index: sorted(each) for index, each in times.items()}


def _history_skips(times: Sequence[int], slot: int, interval: int) -> bool:
    """Whether served history points lie before and after the slot, and none inside it."""
    after = bisect_left(times, slot)
    return 0 < after < len(times) and times[after] >= slot + interval


def check_slots(
    report: Report,
    rows: Sequence[Row],
    gaps_by_ticker: Mapping[str, Sequence[Mapping[str, Any]]],
    tickers: Sequence[str],
    span: tuple[int, int],
    interval: int,
    injected: Sequence[Injected],
    served: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Every slot of the span holds exactly one row, or `/coverage` lists it with a reason an
    injected fault explains; `/coverage` lists no slot that has a row.

    A slot that no tick could take (a process killed, the broker or database gone) may be
    listed as `not_repairable` (no chart point) or `no_trade_in_slot` (no trade): only where
    the simulator's own record shows the history of that kind it served around the slot had
    no point inside it."""
    history_times = {
        reason: _served_history_times(served, kind)
        for reason, kind in (("not_repairable", "chart"), ("no_trade_in_slot", "trade"))
    }
    per_slot: Counter[tuple[str, int]] = Counter()
    for row in rows:
        per_slot[(row.ticker, row.slot_ts if row.slot_ts is not None else row.ts // interval * interval)] += 1
    first, last = span
    for ticker in tickers:
        listed: dict[int, str] = {}
        for gap in gaps_by_ticker.get(ticker, ()):
            for slot in range(int(gap["from_ts"]) // interval * interval, int(gap["to_ts"]) + 1, interval):
                listed[slot] = str(gap["reason"])
        for slot in range(first, last + 1, interval):
            report.expected += 1
            count = per_slot[(ticker, slot)]
            near = _faults_near(injected, slot, interval)
            kinds = tuple(sorted({f.kind for f in near}))
            if count == 1:
                report.stored += 1
                if slot in listed:
                    report.add(Finding("coverage lists a stored slot", ticker, slot, listed[slot], kinds))
            elif count > 1:
                report.stored += 1
                report.duplicated += count - 1
                report.add(Finding("duplicated", ticker, slot, f"{count} rows", kinds))
            elif slot not in listed:
                report.lost += 1
                report.add(Finding("lost", ticker, slot, "no row and /coverage lists no gap", kinds))
            elif _explains(listed[slot], near) or (
                listed[slot] in history_times
                and _explains("no_tick_ran", near)
                and _history_skips(history_times[listed[slot]].get(ticker, []), slot, interval)
            ):
                report.explained[listed[slot]] += 1
            else:
                report.lost += 1
                report.add(Finding("lost", ticker, slot, f"no row; /coverage says {listed[slot]!r}", kinds))


def check_log_claims(
    report: Report,
    rows: Sequence[Row],
    stored_claims: Mapping[str, Mapping[int, int]],
    lost_claims: Sequence[Mapping[str, Any]],
    interval: int,
    injected: Sequence[Injected],
) -> None:
    """Lines that say a slot's tick stored n rows left at least n poll rows in it (a process
    killed after its commit may store more than it ever says)."""
    poll_rows: Counter[int] = Counter(r.slot_ts for r in rows if r.source == "poll" and r.slot_ts is not None)
    for event, claims in stored_claims.items():
        for slot, claimed in sorted(claims.items()):
            if claimed > poll_rows[slot]:
                evidence = (
                    f"{event!r} lines claim stored={claimed}, the table holds {poll_rows[slot]} poll rows"
                )
                near = tuple(
                    sorted({f"{f.kind}@{f.started:.1f}" for f in _faults_near(injected, slot, interval)})
                )
                report.add(Finding("log says stored, no row", None, slot, evidence, near))
    present = {(r.ticker, r.ts) for r in rows}
    said_lost = [c for c in lost_claims if (c.get("ticker"), c.get("ts")) in present]
    if said_lost:
        report.notes.append(
            f"{len(said_lost)} rows logged as 'tick lost' are in the table (a commit that did land)"
        )


def _candles_of(rows: Sequence[Row], size: int, origin: int) -> list[dict[str, Any]]:
    buckets: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        buckets[row.ts - (row.ts - origin) % size].append(row)
    candles = []
    for bucket, members in sorted(buckets.items()):
        members.sort(key=lambda r: r.ts)
        candles.append(
            {
                "ts": bucket,
                "open": members[0].price,
                "high": max(r.price for r in members),
                "low": min(r.price for r in members),
                "close": members[-1].price,
                "count": len(members),
                "backfilled": sum(1 for r in members if r.source == "backfill"),
            }
        )
    return candles


CANDLE_SIZES = {"1m": (60, 0), "1h": (3600, 0), "1d": (86_400, 0)}


def check_candles(
    report: Report,
    rows: Sequence[Row],
    candles: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
    to_ts: int,
) -> None:
    """`/prices/candles` equals the same roll-up computed here over the rows."""
    for (ticker, interval), served in candles.items():
        size, origin = CANDLE_SIZES[interval]
        mine = _candles_of([r for r in rows if r.ticker == ticker and r.ts <= to_ts], size, origin)
        theirs = [
            {key: (int(v) if key in ("ts", "count", "backfilled") else v) for key, v in c.items()}
            for c in served
        ]
        if theirs != mine:
            differ = next((pair for pair in zip(theirs, mine, strict=False) if pair[0] != pair[1]), None)
            evidence = (
                f"{interval}: API {len(theirs)} candles, rows give {len(mine)}; first difference {differ}"
            )
            report.add(Finding("candles disagree with the rows", ticker, None, evidence))


def check_sse(
    report: Report, rows: Sequence[Row], clients: Sequence[SseClient], tickers: Sequence[str]
) -> None:
    """Every client that left and resumed got every row (of its tickers, up to the last it
    got) exactly once, and nothing that is not a row."""
    by_seq = {r.seq: r for r in rows if r.seq is not None and r.ticker in tickers}
    for client in clients:
        seen = Counter(seq for seq, *_ in client.received)
        upto = client.last_id
        for seq, count in seen.items():
            if count > 1:
                report.add(
                    Finding("SSE event twice", None, None, f"{client.name} got seq {seq} {count} times")
                )
            row = by_seq.get(seq)
            event = next(e for e in client.received if e[0] == seq)
            if row is None or (row.ticker, row.ts, row.price) != event[1:]:
                report.add(
                    Finding("SSE event is not the row", None, None, f"{client.name}: {event} vs {row}")
                )
        missing = sorted(seq for seq in by_seq if seq <= upto and seq not in seen)
        if missing:
            sample = [by_seq[s] for s in missing[:5]]
            report.add(
                Finding(
                    "SSE client missed rows", None, None, f"{client.name} missed {len(missing)}: {sample}"
                )
            )
        report.notes.append(f"{client.name}: {len(client.received)} events, {client.resumes} resumes")


def settled_read(database: str, read_api: Any, to_ts: int, attempts: int = 5) -> tuple[list[Row], Any]:
    """The rows up to `to_ts` and an API answer about them from the same moment: read the
    rows, ask the API, read the rows again, and repeat until none up to `to_ts` changed in
    between (the service keeps storing newer ones)."""
    for _ in range(attempts):
        before = [r for r in read_rows(database) if r.ts <= to_ts]
        answer = read_api()
        after = [r for r in read_rows(database) if r.ts <= to_ts]
        if sorted(before, key=_key) == sorted(after, key=_key):
            return after, answer
        time.sleep(1)
    raise RuntimeError("the table kept changing while the API was read")


def _key(row: Row) -> tuple[str, int]:
    return row.ticker, row.ts
