"""A real Celery deployment for tests: worker and beat processes over a throwaway Redis,
the simulator for Deribit and a fresh PostgreSQL database."""

import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy import text

from crypto_client.db.engine import create_engine
from tests.support.services import Process, SimServer, crypto_client
from tests.support.waiting import wait_until

TICKERS = ("btc_usd", "eth_usd", "sol_usdc")

_PUBLISH = """
import sys, time
from crypto_client.worker.celery_app import celery_app
from crypto_client.worker.tasks import TASKS
options = celery_app.conf.beat_schedule["ingest-tick"]["options"]
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(TASKS["ingest-tick"].apply_async(**options).id)
"""


@dataclass
class CeleryStack:
    tmp: Path
    sim: SimServer
    db_url: str
    broker_url: str
    interval: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.db_url,
            "CELERY_BROKER_URL": self.broker_url,
            "DERIBIT_RPC_URL": self.sim.rpc_url,
            "TICKERS": ",".join(TICKERS),
            "INGEST_INTERVAL_SECONDS": str(self.interval),
            "HTTP_TIMEOUT_SECONDS": "5",
            "HTTP_RETRY_BACKOFF_SECONDS": "0.05",
            "CELERY_VISIBILITY_TIMEOUT_SECONDS": "6",
            "LOG_FORMAT": "json",
            **self.extra_env,
        }

    def _start(self, name: str, args: list[str]) -> Process:
        process = Process(crypto_client(*args), self.env, self.tmp / f"{name}.log")
        self.processes.append(process)
        return process

    def worker(self, name: str = "w1", concurrency: int = 2) -> Process:
        process = self._start(
            name,
            [
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
        )
        wait_until(lambda: "ready" in process.output, 30, what=f"worker {name} ready")
        return process

    def beat(self, name: str = "beat") -> Process:
        return self._start(name, ["beat", "--schedule", str(self.tmp / f"{name}-schedule")])

    def publish_time(self) -> float:
        """At once when half the slot (at most a minute) is still ahead, else the next slot's
        start: a test's kill and redelivery fit in the slot wherever the test started."""
        now = time.time()
        slot_end = now - now % self.interval + self.interval
        return now if slot_end - now >= min(self.interval / 2, 60) else slot_end

    def publish_tick(self, at: float | None = None) -> str:
        """Publishes one ingest tick as beat does, at the epoch time `at` (by default
        `publish_time()`). The publisher starts first, so that the time its start takes does not
        delay the tick."""
        if at is None:
            at = self.publish_time()
        result = subprocess.run(
            [sys.executable, "-c", _PUBLISH, str(at)],
            env={**self.env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30 + max(0.0, at - time.time()),
            check=True,
        )
        return result.stdout.strip().splitlines()[-1]

    async def rows(self) -> list[tuple[str, int, int | None]]:
        engine = create_engine(self.db_url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(
                    text("SELECT ticker, ts, slot_ts FROM price_ticks ORDER BY ts")
                )
                return [(ticker, ts, slot) for ticker, ts, slot in result]
        finally:
            await engine.dispose()

    async def source_counts(self) -> Counter[tuple[str, str]]:
        engine = create_engine(self.db_url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(
                    text("SELECT ticker, source, count(*) FROM price_ticks GROUP BY ticker, source")
                )
                return Counter({(ticker, source): count for ticker, source, count in result})
        finally:
            await engine.dispose()

    async def count_by_ticker(self) -> Counter[str]:
        return Counter(ticker for ticker, _, _ in await self.rows())

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()


def kill_pool_children(worker: Process) -> int:
    """SIGKILL the worker's pool processes (as the OOM killer would); returns how many."""
    children = psutil.Process(worker.popen.pid).children(recursive=True)
    for child in children:
        child.send_signal(signal.SIGKILL)
    return len(children)
