"""What the benchmark's parts share: the plan, the results, the database's shape and the
processes it measures."""

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.load import Load
from crypto_client.sim.prices import INDEXES
from tests.support.services import ApiServer

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE_TS = 1_699_999_980  # a whole minute
STEP = 60


@dataclass
class Plan:
    tickers: int
    rows_per_ticker: int
    seconds: float
    connections: int
    ingest_tickers: int
    smoke: bool

    @property
    def names(self) -> list[str]:
        return list(INDEXES)[: self.tickers]

    @property
    def depth(self) -> int:
        return min(400_000, int(self.rows_per_ticker * 0.8))


@dataclass
class Results:
    rows: list[tuple[str, Load, Load | None]] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    targets: list[tuple[str, bool, str]] = field(default_factory=list)
    bytes_per_row: dict[str, float] = field(default_factory=dict)

    def load(self, name: str) -> Load:
        return next(ours for label, ours, _ in self.rows if label == name)

    def baseline(self, name: str) -> Load:
        base = next(base for label, _, base in self.rows if label == name)
        assert base is not None
        return base


@contextmanager
def server(args: list[str], env: dict[str, str], port: int, log_name: str) -> Iterator[psutil.Process]:
    with ApiServer(args, env, WORK / log_name, port=port) as api:
        yield psutil.Process(api.process.popen.pid)


@contextmanager
def sampling(process: psutil.Process, sample: Callable[[list[psutil.Process]], None]) -> Iterator[None]:
    """Call `sample` with the server's process family every 20 ms while the block runs: its
    own process and its workers (granian serves from a child process)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                sample([process, *process.children(recursive=True)])
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def peak_rss(process: psutil.Process) -> Iterator[list[float]]:
    peak = [0.0]

    def sample(family: list[psutil.Process]) -> None:
        peak[0] = max(peak[0], sum(each.memory_info().rss for each in family) / 2**20)

    with sampling(process, sample):
        yield peak


def one_at_a_time_ms(url: str, times: int = 5) -> float:
    """The median of `times` requests made one after another on one kept-alive connection
    (a client per request would add its own set-up, ~20-40 ms of TLS context, to each)."""
    timings = []
    with httpx.Client(timeout=120) as client:
        for _ in range(times):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)
