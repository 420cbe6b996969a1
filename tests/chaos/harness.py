"""The chaos run: the real processes against the simulator, faults injected at random from a
seed, then the independent checker (`tests/chaos/checker.py`) over what is really stored.

Two runs: `postgresql` (Celery worker and beat over Redis, the `stream` consumer and the `api`,
on PostgreSQL behind a fault-injecting proxy) and `sqlite` (the embedded `serve`).
"""

import asyncio
import contextlib
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.chaos import checker
from tests.chaos.checker import Injected, Report
from tests.support.databases import create_pg_database, plain_dsn
from tests.support.pg_proxy import PgProxy
from tests.support.services import (
    ApiServer,
    Process,
    SimServer,
    ThrowawayPostgres,
    ThrowawayRedis,
    crypto_client,
    free_port,
)
from tests.support.small_filesystem import SmallFilesystem
from tests.support.waiting import wait_until

TICKERS = ("btc_usd", "eth_usd", "sol_usdc")
INTERVAL = 1
BACKFILL_EVERY_SECONDS = 4
START_ATTEMPTS = 5
START_UP_FAILURE = "crypto-client: cannot use the database"  # the start-up check's one line
SQLITE_DISK_BYTES = 64 << 20  # room for hours of three tickers at 1 s slots
# The chart's points one slot apart, so a missed slot can be repaired from Deribit's history.
CHART_STEP_SCALE = str(1 / 6)

PG_FAULTS = (
    "proxy_cut_commit_before",
    "proxy_cut_commit_after",
    "proxy_cut_mid_query",
    "proxy_cut_all",
    "proxy_latency",
    "pg_restart",
    "redis_restart",
    "kill_worker",
    "kill_beat",
    "kill_stream",
    "kill_api",
    "sim_outage",
    "sim_rate_limit",
    "sim_garbage",
    "sim_bad_result",
    "sim_clock_lie",
    "ws_drop",
    "ws_stall",
    "ws_malformed",
)
# Faults whose simulator knob (the first) may not exist yet: in the plan when it does.
OPTIONAL_FAULTS = {
    "ws_hostile": "ws_hostile_next",
    "ws_unsubscribed": "ws_unsubscribed_channels",
    "sim_bad_chart": "chart_bad_point_rate",
    "sim_empty_chart": "chart_empty_rate",
}
HOSTILE_FRAMES = (
    "truncated",
    "not_json",
    "not_an_object",
    "binary",
    "deep_nesting",
    "huge",
    "heartbeat_params_not_object",
    "timestamp_overflow",
    "string_price",
    "index_name_mismatch",
)
UNCONFIGURED = "ltc_usd"  # an index the simulator knows and the service does not track
SQLITE_FAULTS = (
    "kill_serve",
    "disk_full",
    "sim_outage",
    "sim_rate_limit",
    "sim_garbage",
    "sim_bad_result",
    "sim_clock_lie",
    "ws_drop",
    "ws_stall",
    "ws_malformed",
)


@dataclass(frozen=True)
class PlannedFault:
    at: float  # seconds after the faults begin
    kind: str
    seconds: float  # how long it lasts (for faults with a duration)


def schedule(seed: int, kinds: tuple[str, ...], seconds: float) -> list[PlannedFault]:
    """The fault plan of a run: the same seed and kinds give the same plan."""
    rng = random.Random(seed)
    plan: list[PlannedFault] = []
    at = rng.uniform(1, 3)
    while at < seconds:
        plan.append(PlannedFault(round(at, 2), rng.choice(kinds), round(rng.uniform(1, 5), 2)))
        at += rng.uniform(2, 6)
    return plan


@dataclass
class Summary:
    backend: str
    seed: int
    seconds: float
    faults: Counter[str]
    report: Report
    rss_mb: dict[str, tuple[float, float]]
    schedule: list[PlannedFault]
    log_paths: list[Path] = field(default_factory=list)

    def logs_around_findings(self, margin_seconds: float = 3.0, max_lines: int = 300) -> list[str]:
        """The processes' log lines from a little before the first slot a finding names to a
        little after the last: what a failed run in CI leaves to read once its files are gone."""
        slots = [f.slot_ts for f in self.report.findings if f.slot_ts is not None]
        if not slots:
            return []
        start, end = min(slots) - margin_seconds, max(slots) + 1 + margin_seconds
        lines: list[tuple[float, str]] = []
        for path in self.log_paths:
            if not path.exists():
                continue  # a process that never started has no log
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    when = datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()
                    if start <= when <= end:
                        lines.append((when, f"{path.stem}: {line}"))
        return [line for _, line in sorted(lines)[:max_lines]]

    def table(self) -> str:
        r = self.report
        lines = [
            f"### chaos run: {self.backend}, seed {self.seed}, {self.seconds:.0f} s of faults",
            "",
            "| Measure | Result |",
            "| --- | --- |",
            f"| faults injected ({sum(self.faults.values())}) | "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
            + " |",
            f"| slots expected | {r.expected} |",
            f"| slots stored | {r.stored} |",
            f"| slots explained | {sum(r.explained.values())} ("
            + ", ".join(f"{k} {n}" for k, n in sorted(r.explained.items()))
            + ") |",
            f"| slots lost | {r.lost} |",
            f"| rows duplicated | {r.duplicated} |",
            f"| rows wrong | {r.wrong} |",
            f"| other findings | {len(r.findings) - r.lost - r.duplicated - r.wrong} |",
            "| RSS MB start -> end | "
            + ", ".join(f"{name} {a:.0f} -> {b:.0f}" for name, (a, b) in sorted(self.rss_mb.items()))
            + " |",
        ]
        return "\n".join(lines)


def _rss_mb(process: Process) -> float:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(process.popen.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    return 0.0


@dataclass
class Run:
    """One chaos run: its processes, its fault injection and what was injected."""

    tmp: Path
    backend: str
    seed: int
    sim: SimServer
    env: dict[str, str]
    starters: dict[str, Callable[[], Process]]
    api_url: Callable[[], str]
    database: str  # what the checker reads: a plain DSN or a SQLite path
    log_paths: list[Path] = field(default_factory=list)
    processes: dict[str, Process] = field(default_factory=dict)
    injected: list[Injected] = field(default_factory=list)
    rss_start: dict[str, float] = field(default_factory=dict)
    proxy: PgProxy | None = None
    postgres: ThrowawayPostgres | None = None
    redis: ThrowawayRedis | None = None
    disk: SmallFilesystem | None = None
    rng: random.Random = field(default_factory=random.Random)
    notes: list[str] = field(default_factory=list)
    deaths: list[tuple[str, float, str]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def start_all(self) -> None:
        for name in self.starters:
            self.processes[name] = self.supervised_start(name)

    def measure_rss_start(self) -> None:
        self.rss_start = {name: _rss_mb(process) for name, process in self.processes.items()}

    def stop(self, *names: str) -> None:
        for name in names or list(self.processes):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()

    def kill9(self, name: str) -> None:
        """SIGKILL the process and everything it started (a worker's pool too), then start
        it again."""
        with self.lock:
            process = self.processes[name]
            process.signal_group(signal.SIGKILL)
            process.popen.wait(10)
            process.stop()
            self.processes[name] = self.supervised_start(name)

    def supervise_once(self) -> None:
        """What systemd or compose does: a process that exited on its own is started again.
        An exit at start-up (the start-up check found the database unreachable) is noted; any
        other exit is a death, and a finding."""
        with self.lock:
            for name, process in list(self.processes.items()):
                if process.popen.poll() is None:
                    continue
                tail = process.output[-600:].replace("\n", " | ")
                process.stop()
                if START_UP_FAILURE in tail:
                    self.notes.append(f"{name} exited at start, started again: {tail[-300:]}")
                else:
                    self.deaths.append((name, time.time(), tail))
                self.processes[name] = self.supervised_start(name)

    def supervised_start(self, name: str) -> Process:
        """Start `name` as a supervisor (systemd, compose) would: a start-up check that fails
        (the database unreachable at that moment) exits in one line, and is started again."""
        for attempt in range(1, START_ATTEMPTS):
            try:
                return self.starters[name]()
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[-2:]
                self.notes.append(f"{name} exited at start (attempt {attempt}), started again: {reason}")
                time.sleep(attempt)
        return self.starters[name]()

    def inject(self, fault: PlannedFault) -> None:
        started = time.time()
        detail = self._apply(fault)
        self.injected.append(Injected(fault.kind, started, time.time(), detail))

    def _sim(self, **changes: Any) -> None:
        self.sim.faults(**changes)

    def _apply(self, fault: PlannedFault) -> str:
        kind, seconds = fault.kind, fault.seconds
        proxy = self.proxy
        if kind.startswith("kill_"):
            self.kill9(kind.removeprefix("kill_"))
            return f"kill -9 {kind.removeprefix('kill_')}"
        if proxy is not None and kind.startswith("proxy_"):
            match kind:
                case "proxy_cut_commit_before":
                    proxy.cut_next_commit("before")
                case "proxy_cut_commit_after":
                    proxy.cut_next_commit("after")
                case "proxy_cut_mid_query":
                    proxy.cut_mid_query()
                case "proxy_cut_all":
                    proxy.cut_all()
                case _:
                    proxy.set_latency(0.3)
                    time.sleep(seconds)
                    proxy.set_latency(0.0)
            return f"{seconds}s" if kind == "proxy_latency" else "armed"
        if kind == "pg_restart" and self.postgres is not None:
            self.postgres.stop()
            time.sleep(seconds)
            self.postgres.start()
            return f"down {seconds}s"
        if kind == "disk_full" and self.disk is not None:
            taken = self.disk.fill()
            time.sleep(seconds)
            self.disk.free()
            return f"{taken} free bytes taken for {seconds}s"
        if kind == "redis_restart" and self.redis is not None:
            self.redis.stop()
            time.sleep(seconds)
            self.redis.start()
            return f"down {seconds}s"
        switches: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
            "sim_outage": ({"outage": True}, {"outage": False}),
            "sim_rate_limit": (
                {"rate_limit_rate": 0.5, "retry_after_seconds": 0.2},
                {"rate_limit_rate": 0.0},
            ),
            "sim_garbage": ({"malformed_rate": 0.5}, {"malformed_rate": 0.0}),
            "sim_clock_lie": (
                {"clock_offset_seconds": self.rng.choice((-120.0, -30.0, 45.0, 3600.0))},
                {"clock_offset_seconds": 0.0},
            ),
            "ws_stall": ({"ws_stall": True}, {"ws_stall": False}),
            "ws_unsubscribed": (
                {"ws_unsubscribed_channels": [f"deribit_price_index.{UNCONFIGURED}"]},
                {"ws_unsubscribed_channels": []},
            ),
            "sim_bad_chart": ({"chart_bad_point_rate": 0.3}, {"chart_bad_point_rate": 0.0}),
            "sim_empty_chart": (
                {"chart_empty_rate": 0.5, "chart_out_of_window_rate": 0.3},
                {"chart_empty_rate": 0.0, "chart_out_of_window_rate": 0.0},
            ),
        }
        if kind in switches:
            on, off = switches[kind]
            self._sim(**on)
            time.sleep(seconds)
            self._sim(**off)
            return f"{on} for {seconds}s"
        if kind == "sim_bad_result":
            self._sim(fail_next=len(TICKERS), fail_next_kind="bad_result")
            return "the next answers are not numbers"
        if kind == "ws_drop":
            disconnects = httpx.get(f"{self.sim.url}/_sim/faults").json()["default"]["ws_disconnects"]
            self._sim(ws_disconnects=disconnects + 1)
            return "every open WebSocket dropped"
        if kind == "ws_hostile":
            frames = self.rng.sample(HOSTILE_FRAMES, 3)
            self._sim(ws_hostile_next=frames)
            return f"hostile frames {frames}"
        if kind == "ws_malformed":
            self._sim(ws_malformed_next=3)
            return "the next 3 notifications are truncated JSON"
        raise ValueError(f"unknown fault kind {kind!r}")

    def fault_kinds(self) -> tuple[str, ...]:
        """This run's fault kinds: its backend's, and those the simulator has knobs for."""
        knobs = httpx.get(f"{self.sim.url}/_sim/faults").json()["default"]
        base = PG_FAULTS if self.backend == "postgresql" else SQLITE_FAULTS
        return base + tuple(kind for kind, knob in OPTIONAL_FAULTS.items() if knob in knobs)

    def rss_end(self) -> dict[str, tuple[float, float]]:
        return {name: (self.rss_start.get(name, 0.0), _rss_mb(p)) for name, p in self.processes.items()}


def _base_env(sim: SimServer, database_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "DERIBIT_RPC_URL": sim.rpc_url,
        "DERIBIT_WS_URL": sim.ws_url,
        "TICKERS": ",".join(TICKERS),
        "INGEST_INTERVAL_SECONDS": str(INTERVAL),
        "DERIBIT_TIMEOUT_SECONDS": "2",
        "DERIBIT_RETRY_BACKOFF_SECONDS": "0.05",
        "BACKFILL_INTERVAL_SECONDS": str(BACKFILL_EVERY_SECONDS),
        "STREAM_STALL_SECONDS": "3",
        "LOG_FORMAT": "json",
    }


@contextlib.contextmanager
def postgres_run(tmp: Path, seed: int) -> Iterator[Run]:
    """Worker, beat, stream consumer and API on a throwaway PostgreSQL (behind the proxy)
    and a throwaway Redis."""
    sim = SimServer(tmp, seed, "--chart-step-scale", CHART_STEP_SCALE)
    postgres = ThrowawayPostgres()
    redis = ThrowawayRedis()
    proxy = PgProxy("127.0.0.1", postgres.port)
    try:
        direct_url = asyncio.run(create_pg_database(postgres.url))
        env = {
            **_base_env(sim, proxy.url(direct_url)),
            "CELERY_BROKER_URL": redis.url,
            "CELERY_VISIBILITY_TIMEOUT_SECONDS": "6",
        }
        api_port = free_port()

        def process(name: str, args: list[str]) -> Callable[[], Process]:
            path = tmp / f"{name}.log"
            run.log_paths.append(path)

            def start() -> Process:
                return Process(crypto_client(*args), env, path)

            return start

        def worker() -> Process:
            started = start_worker()
            wait_until(lambda: started.output.count("ready") > worker_ready[0], 60, what="worker ready")
            worker_ready[0] = started.output.count("ready")
            return started

        def api() -> Process:
            server = ApiServer(
                crypto_client("api", "--port", str(api_port)), env, tmp / "api.log", port=api_port
            )
            return server.process

        worker_ready = [0]
        run = Run(
            tmp,
            "postgresql",
            seed,
            sim,
            env,
            starters={},
            api_url=lambda: f"http://127.0.0.1:{api_port}",
            database=plain_dsn(direct_url),
            proxy=proxy,
            postgres=postgres,
            redis=redis,
            rng=random.Random(seed),
        )
        start_worker = process(
            "worker",
            [
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "-n",
                "w1@%h",
                "--without-mingle",
                "--without-gossip",
            ],
        )
        run.starters = {
            "worker": worker,
            "beat": process("beat", ["beat", "--schedule", str(tmp / "beat-schedule")]),
            "stream": process("stream", ["stream"]),
            "api": api,
        }
        yield run
    finally:
        with contextlib.suppress(Exception):
            run.stop()
        proxy.close()
        redis.destroy()
        postgres.destroy()
        sim.stop()


@contextlib.contextmanager
def sqlite_run(tmp: Path, seed: int) -> Iterator[Run]:
    """The embedded `serve` on SQLite, its file on a small filesystem that can be filled."""
    sim = SimServer(tmp, seed, "--chart-step-scale", CHART_STEP_SCALE)
    disk = SmallFilesystem(SQLITE_DISK_BYTES)
    database = disk.path / "chaos.db"
    env = {**_base_env(sim, f"sqlite:///{database}"), "STREAM_ENABLED": "true"}
    port = free_port()

    def serve() -> Process:
        server = ApiServer(
            crypto_client("serve", "--port", str(port)),
            env,
            tmp / "serve.log",
            port=port,
            ready_path="/livez",
        )
        return server.process

    run = Run(
        tmp,
        "sqlite",
        seed,
        sim,
        env,
        starters={"serve": serve},
        api_url=lambda: f"http://127.0.0.1:{port}",
        database=str(database),
        log_paths=[tmp / "serve.log"],
        rng=random.Random(seed),
        disk=disk,
    )
    try:
        yield run
    finally:
        run.stop()
        disk.close()
        sim.stop()


def execute(run: Run, fault_seconds: float, quiet_seconds: float, sse_clients: int = 2) -> Summary:
    """Start everything, inject the seeded faults for `fault_seconds`, let the service repair
    for `quiet_seconds`, then check what is stored."""
    plan = schedule(run.seed, run.fault_kinds(), fault_seconds)
    run.start_all()
    rng = random.Random(run.seed)
    clients = [
        checker.SseClient(run.api_url(), f"sse-{n}", [rng.randint(3, 40) for _ in range(20)])
        for n in range(sse_clients)
    ]
    for client in clients:
        client.start()
    # The span begins once a slot has run with everything up, and ends a few slots before
    # the faults stop being repaired.
    wait_until(lambda: checker.read_rows(run.database), 60, 0.5, what="the first row")
    supervising = threading.Event()

    def supervise() -> None:
        while not supervising.wait(0.5):
            run.supervise_once()

    supervisor = threading.Thread(target=supervise, name="supervisor", daemon=True)
    supervisor.start()
    run.measure_rss_start()  # once the first row is in: every process has started up
    began = time.time()
    first_slot = (int(began) // INTERVAL + 2) * INTERVAL
    for fault in plan:
        delay = began + fault.at - time.time()
        if delay > 0:
            time.sleep(delay)
        run.inject(fault)
    faults_ended = max(time.time(), began + fault_seconds)
    last_slot = (int(faults_ended) // INTERVAL) * INTERVAL
    time.sleep(max(0.0, faults_ended + quiet_seconds - time.time()))

    # The SSE clients catch up with the table before they are judged.
    newest = max((r.seq or 0) for r in checker.read_rows(run.database))
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all(c.last_id >= newest for c in clients), 20, 0.2, what="SSE clients caught up")
    for client in clients:
        client.stop()
    for client in clients:
        client.join(10)

    api = run.api_url()
    to_ts = last_slot + INTERVAL - 1

    def read_api() -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
        gaps = {t: checker.read_coverage(api, t, first_slot, to_ts) for t in TICKERS}
        candles = {
            (t, i): checker.read_candles(api, t, i, 0, to_ts) for t in TICKERS for i in checker.CANDLE_SIZES
        }
        return gaps, candles

    rss = run.rss_end()
    supervising.set()
    supervisor.join(10)
    run.supervise_once()  # a death since the last look counts too
    rows, (gaps, candles) = checker.settled_read(run.database, read_api, to_ts)
    # Every process has exited before its log is held against the table: a tick that commits
    # and logs while the checker reads would otherwise be a "stored" line without a row.
    run.stop()
    report = Report(notes=list(run.notes))
    # The rows first, then the record: every row's value was served before it was read.
    every_row = checker.read_rows(run.database)  # a superset of `rows`: nothing is deleted
    served = checker.read_served(run.sim.url)
    checker.check_rows(report, every_row, served, TICKERS, INTERVAL, run.injected)
    checker.check_slots(report, rows, gaps, TICKERS, (first_slot, last_slot), INTERVAL, run.injected, served)
    stored_claims, lost_claims = checker.log_claims(run.log_paths)
    checker.check_log_claims(report, every_row, stored_claims, lost_claims, INTERVAL, run.injected)
    checker.check_candles(report, rows, candles, to_ts)
    checker.check_sse(report, every_row, clients, TICKERS)
    for name, when, tail in run.deaths:
        evidence = f"{name} exited at {when:.1f} with nothing killing it; its log ends: {tail}"
        near = tuple(
            f"{f.kind}@{f.started:.1f}" for f in run.injected if f.started - 30 <= when <= f.ended + 5
        )
        report.add(checker.Finding("process died unkilled", None, None, evidence, near))
    return Summary(
        run.backend,
        run.seed,
        fault_seconds,
        Counter(f.kind for f in run.injected),
        report,
        rss,
        plan,
        list(run.log_paths),
    )
