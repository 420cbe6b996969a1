"""The data lake on disk: one Parquet file per ticker per UTC day, `DIR/<ticker>/<YYYY-MM-DD>.parquet`,
and `DIR/manifest.json` describing each file (rows, first and last ts, the day's coverage and
quality figures, sha256).

A closed day whose every slot has a row is final: its file is written once, and a rerun
checks its hash instead of reading the database again. Any other day (today, or one with
missing slots a back-fill may still repair) is rewritten on every run.
"""

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from crypto_client import exact_json
from crypto_client.domain import DAY_SECONDS, MAX_TS, current_slot
from crypto_client.export.parquet import OpenReader, write_file
from crypto_client.export.quality import day_name, report_day, span_of

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(slots=True)
class LakeRun:
    written: int = 0
    unchanged: int = 0  # final files whose hash was checked
    removed: int = 0  # files of days that have no rows any more
    problems: list[str] = field(default_factory=list)


class DayProgress:
    """What the lake reports as it goes (a progress bar on a terminal)."""

    def start(self, ticker: str, days: int) -> None: ...

    def advance(self) -> None: ...


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    files: dict[str, Any] = orjson.loads(path.read_bytes())["files"]
    return files


def _open_lake(folder: Path) -> dict[str, Any]:
    """The manifest's files of the lake in `folder`, created when new."""
    folder.mkdir(parents=True, exist_ok=True)
    return read_manifest(folder)


def _check_final(path: Path, sha256: str) -> str | None:
    """What is wrong with a final file, if anything."""
    if not path.exists():
        return f"{path}: missing, but the manifest lists it as final; delete its entry to write it again"
    if sha256_of(path) != sha256:
        return (
            f"{path}: its sha256 differs from the manifest's (the file changed after it was"
            " written); delete it and its manifest entry to write it again"
        )
    return None


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    unfinished = path.with_name(f".{path.name}.partial")
    write(unfinished)
    os.replace(unfinished, path)


def _write_manifest(out: Path, files: dict[str, Any], interval: int, now: float) -> None:
    manifest = {
        "version": MANIFEST_VERSION,
        "generated_at": int(now),
        "interval_seconds": interval,
        "files": dict(sorted(files.items())),
    }
    _write_atomically(out / MANIFEST, lambda path: path.write_bytes(exact_json.dumps(manifest) + b"\n"))


async def write_lake(
    open_reader: OpenReader,
    out: Path,
    tickers: Sequence[str] | None,
    *,
    interval: int,
    from_ts: int | None = None,
    to_ts: int | None = None,
    progress: DayProgress | None = None,
    now: float | None = None,
) -> LakeRun:
    """Write (or bring up to date) the lake in `out` for `tickers` (default: every stored one)."""
    moment = time.time() if now is None else now
    report = progress or DayProgress()
    lower, upper = from_ts or 0, MAX_TS if to_ts is None else to_ts
    files = _open_lake(out)
    if tickers is None:
        async with open_reader() as reader:
            tickers = await reader.stored_tickers()
    run = LakeRun()
    # A day is closed once its last slot has ended.
    closed_before = current_slot(interval, moment)
    for ticker in tickers:
        span = await span_of(open_reader, ticker, interval, lower, upper, moment)
        # Days after the newest row would have no file: they are not read.
        days = []
        if span.first_day is not None and span.last_row_ts is not None:
            days = list(range(span.first_day, span.last_row_ts + 1, DAY_SECONDS))
        report.start(ticker, len(days))
        for day_start in days:
            name = f"{ticker}/{day_name(day_start)}.parquet"
            path = out / name
            known = files.get(name)
            if known is not None and known["immutable"]:
                problem = _check_final(path, known["sha256"])
                if problem is None:
                    run.unchanged += 1
                else:
                    run.problems.append(problem)
                report.advance()
                continue
            rows, figures = await report_day(open_reader, ticker, interval, span, day_start, lower, upper)
            if rows.num_rows == 0:
                if known is not None:
                    path.unlink(missing_ok=True)
                    del files[name]
                    run.removed += 1
                report.advance()
                continue
            _write_atomically(path, partial(write_file, table=rows))
            whole_day = DAY_SECONDS // interval
            final = (
                day_start + DAY_SECONDS <= closed_before
                and figures["expected_slots"] == whole_day
                and figures["missing_slots"] == 0
            )
            files[name] = {
                "ticker": ticker,
                "day": figures["day"],
                "rows": figures["rows"],
                "first_ts": figures["first_ts"],
                "last_ts": figures["last_ts"],
                "coverage": figures["completeness"],
                "sha256": sha256_of(path),
                "immutable": final,
                "quality": figures,
            }
            run.written += 1
            report.advance()
        # After each ticker: an interrupted run keeps what it finished.
        _write_manifest(out, files, interval, moment)
    _write_manifest(out, files, interval, moment)
    return run


class BarProgress(DayProgress):
    """A progress bar per ticker on a terminal (rich); nothing when output is redirected."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, ticker: str, days: int) -> None:
        self._task = self._progress.add_task(ticker, total=days)

    def advance(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)


@contextmanager
def terminal_progress() -> Iterator[DayProgress]:
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("days"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        yield BarProgress(progress)
