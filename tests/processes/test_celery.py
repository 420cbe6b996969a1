"""Ingestion through real Celery worker and beat processes over Redis."""

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from crypto_client.worker.celery_app import SLOT_HEADER
from tests.support.celery_stack import TICKERS, CeleryStack, kill_pool_children
from tests.support.databases import create_pg_database, drop_pg_database
from tests.support.services import ApiServer, Process, SimServer, ThrowawayRedis
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow


@pytest.fixture
async def stack(sim: SimServer, redis_server: ThrowawayRedis, tmp_path: Path) -> AsyncIterator[CeleryStack]:
    db_url = await create_pg_database()
    stack = CeleryStack(tmp=tmp_path, sim=sim, db_url=db_url, broker_url=redis_server.url)
    yield stack
    stack.stop_all()
    await drop_pg_database(db_url)


async def wait_for_rows(stack: CeleryStack, per_ticker: int, timeout: float) -> None:
    async def enough() -> bool:
        counts = await stack.count_by_ticker()
        return all(counts[ticker] >= per_ticker for ticker in TICKERS)

    try:
        await wait_until_async(enough, timeout, interval=0.2, what=f"{per_ticker} rows per ticker")
    except TimeoutError as exc:
        logs = "\n".join(p.output[-3000:] for p in stack.processes)
        raise AssertionError(f"{exc}: {dict(await stack.count_by_ticker())}\n{logs}") from None


async def wait_for_log(process: Process, text: str, count: int = 1, timeout: float = 30) -> None:
    """Wait until `process` has logged `text` `count` times: the work it marks is over."""
    await asyncio.to_thread(
        wait_until, lambda: process.output.count(text) >= count, timeout, what=f"{count}x {text}"
    )


async def wait_for_no_task(stack: CeleryStack) -> None:
    """Wait until no task is queued or running: the queue is empty and, since tasks are acked
    late, no delivered message is left unacknowledged."""
    broker = redis.Redis.from_url(stack.broker_url)
    try:

        def idle() -> bool:
            return broker.llen("celery") == 0 and broker.hlen("unacked") == 0

        await asyncio.to_thread(wait_until, idle, 30, what="no task queued or running")
    finally:
        broker.close()


def assert_one_row_per_slot(rows: list[tuple[str, int, int | None]], interval: int) -> None:
    slots = [(ticker, slot) for ticker, _, slot in rows]
    assert len(slots) == len(set(slots)), "a slot was stored twice"
    for _ticker, ts, slot in rows:
        assert slot is not None
        assert slot <= ts < slot + interval, "an observation outside its slot"


async def test_worker_and_beat_store_every_ticker_every_interval(stack: CeleryStack) -> None:
    stack.sim.faults(clock_offset_seconds=7200)  # Deribit's clock two hours ahead changes nothing
    stack.worker()
    stack.beat()
    await wait_for_rows(stack, per_ticker=3, timeout=30)
    rows = await stack.rows()
    assert_one_row_per_slot(rows, stack.interval)
    worker_log = stack.processes[0].output
    assert '"task started"' in worker_log
    assert '"task finished"' in worker_log
    assert "Future attached to a different loop" not in worker_log
    assert "Traceback" not in worker_log
    assert '"source time not used, storing the local receive time"' in worker_log
    assert all(abs(ts - time.time()) < 60 for _, ts, _ in rows)


async def test_two_beats_still_give_one_row_per_ticker_per_slot(stack: CeleryStack) -> None:
    stack.worker(concurrency=2)
    stack.beat("beat-a")
    stack.beat("beat-b")
    await wait_for_rows(stack, per_ticker=4, timeout=30)
    await wait_for_log(stack.processes[0], '"slot already claimed, skipping"')
    rows = await stack.rows()
    assert_one_row_per_slot(rows, stack.interval)
    # Both beats published every slot, yet Deribit was asked about once per slot: the slot
    # claim in Redis stopped the second task before it fetched.
    beat_logs = [p.output for p in stack.processes[1:]]
    assert all(log.count("Sending due task") >= 3 for log in beat_logs)
    stored = sum(1 for ticker, _, _ in rows if ticker == "btc_usd")
    assert stack.sim.requests_for("btc_usd") <= stored + 2
    assert '"slot already claimed, skipping"' in stack.processes[0].output


@pytest.mark.long
async def test_at_a_ten_second_interval_a_killed_workers_slot_is_stored_within_the_slot(
    stack: CeleryStack,
) -> None:
    stack.interval = 10
    stack.extra_env["CELERY_VISIBILITY_TIMEOUT_SECONDS"] = ""  # derived from the interval
    stack.sim.faults(latency_ms=3000)
    first = stack.worker("w1", concurrency=1)
    assert "cannot be recovered within the slot" not in first.output
    # Publish as beat would, right at the start of a slot far enough ahead for the publisher
    # to have started by then.
    slot_start = (time.time() // 10 + 1) * 10
    if slot_start - time.time() < 4:
        slot_start += 10
    task_id = await _publish_tick_until_at_deribit(stack, slot_start + 0.05)
    first.signal_group(signal.SIGKILL)  # the whole worker, mid-fetch
    first.stop()
    stack.sim.reset()
    assert await stack.rows() == []
    second = stack.worker("w2", concurrency=1)
    await wait_for_rows(stack, per_ticker=1, timeout=30)
    await wait_for_log(second, '"task finished"')
    assert task_id in second.output  # the same message, redelivered
    rows = await stack.rows()
    assert len(rows) == len(TICKERS)
    assert len({slot for _, _, slot in rows}) == 1
    for _ticker, ts, slot in rows:
        assert slot is not None
        assert slot <= ts < slot + 10, f"stored at {ts - slot}s into a 10 s slot"


async def test_an_interval_too_short_to_recover_a_killed_worker_is_warned_about(stack: CeleryStack) -> None:
    worker = stack.worker("w1")  # the stack's 1 s interval
    await wait_for_log(worker, "cannot be recovered within the slot")
    assert '"recovery_seconds"' in worker.output


async def test_killed_pool_process_task_is_requeued_at_once(stack: CeleryStack) -> None:
    stack.interval = 60
    stack.sim.faults(latency_ms=3000)
    worker = stack.worker("w1", concurrency=1)
    await _publish_tick_until_at_deribit(stack)
    assert kill_pool_children(worker) == 1
    stack.sim.reset()
    await wait_for_rows(stack, per_ticker=1, timeout=30)
    await wait_for_log(worker, '"task finished"')
    assert len(await stack.rows()) == len(TICKERS)
    assert "WorkerLostError" in worker.output or "exited with" in worker.output


async def test_worker_and_beat_survive_a_redis_restart(
    stack: CeleryStack, redis_server: ThrowawayRedis
) -> None:
    stack.worker()
    stack.beat()
    await wait_for_rows(stack, per_ticker=2, timeout=30)
    redis_server.stop()
    await asyncio.sleep(3)
    redis_server.start()
    restarted_at = time.time()
    deadline = time.monotonic() + 45
    while True:
        rows = await stack.rows()
        fresh = {ticker for ticker, ts, _ in rows if ts > restarted_at + 1}
        if fresh == set(TICKERS):
            break
        assert time.monotonic() < deadline, "\n".join(p.output[-3000:] for p in stack.processes)
        await asyncio.sleep(0.5)
    assert_one_row_per_slot(await stack.rows(), stack.interval)


def _unacked_tick_slot(broker_url: str) -> int | None:
    """The slot of the one message delivered and not acknowledged (its tick runs), once the
    worker's next BRPOP waits in Redis too; None before."""
    broker = redis.Redis.from_url(broker_url)
    try:
        waiting = any(c["cmd"] == "brpop" and "b" in c["flags"] for c in broker.client_list())
        unacked = broker.hvals("unacked")
        if not waiting or len(unacked) != 1:
            return None
        payload, _exchange, _routing_key = json.loads(unacked[0])
        return int(payload["headers"][SLOT_HEADER])
    finally:
        broker.close()


@pytest.mark.long
async def test_worker_survives_a_redis_restart_with_a_tick_in_flight(stack: CeleryStack) -> None:
    """Issue 22: a worker that lost Redis while a tick ran, its next BRPOP waiting, died in
    kombu's transport (`_connparams` of a closed connection: AttributeError, `hostname`) and
    stored nothing more. It must reconnect by itself; Redis keeps the tick's message across the
    restart (on disk, as compose's does), and every slot is stored once."""
    broker = ThrowawayRedis(persistent=True)
    stack.broker_url = broker.url
    try:
        stack.interval = 10
        stack.sim.faults(latency_ms=4000)
        # Two pool processes: while one runs the tick, the worker waits on BRPOP for the next.
        worker = stack.worker("w1", concurrency=2)
        # Publish as beat would, right at the start of a slot: the slow fetch ends inside it.
        now = time.time()
        await _publish_tick_until_at_deribit(stack, now - now % 10 + 10.05)
        in_flight_slot = await asyncio.to_thread(
            wait_until,
            lambda: _unacked_tick_slot(broker.url),
            30,
            what="the tick unacknowledged and a BRPOP waiting",
        )
        assert in_flight_slot is not None
        broker.stop()
        await wait_for_log(worker, "Connection to broker lost")
        stack.sim.reset()
        broker.start()
        stack.beat()

        # Under the bug the worker logs "Unrecoverable error" at once, then exits once the tick
        # finishes: fail as soon as it says so, with its log.
        deadline = time.monotonic() + 60
        while True:
            assert "Unrecoverable error" not in worker.output, worker.output[-6000:]
            assert worker.popen.poll() is None, worker.output[-6000:]
            rows = await stack.rows()
            if {ticker for ticker, _, slot in rows if slot is not None and slot > in_flight_slot} == set(
                TICKERS
            ):
                break
            assert time.monotonic() < deadline, "\n".join(p.output[-3000:] for p in stack.processes)
            await asyncio.sleep(0.5)
        stack.processes[-1].stop()  # beat: no more ticks, so the queue can drain
        await wait_for_no_task(stack)  # the tick's message too: acknowledged, or delivered again
        assert worker.popen.poll() is None
        assert "Unrecoverable error" not in worker.output
        rows = await stack.rows()
        assert_one_row_per_slot(rows, stack.interval)
        assert sorted(ticker for ticker, _, slot in rows if slot == in_flight_slot) == sorted(TICKERS)
    finally:
        stack.stop_all()
        broker.destroy()


async def _publish_tick_until_at_deribit(stack: CeleryStack, at: float | None = None) -> str:
    """Publishes a tick and returns its task id once its fetch is in flight at Deribit. The
    watch starts with the publisher: its exit can take longer than the fetch does."""
    at = stack.publish_time() if at is None else at
    publishing = asyncio.ensure_future(asyncio.to_thread(stack.publish_tick, at))
    await asyncio.to_thread(
        wait_until,
        lambda: stack.sim.stats()["in_flight"] > 0,
        30 + max(0.0, at - time.time()),
        what="the task to reach Deribit",
    )
    return await publishing


@pytest.mark.long
async def test_beat_and_worker_repair_recent_gaps_from_deribits_history(stack: CeleryStack) -> None:
    stack.extra_env["BACKFILL_INTERVAL_SECONDS"] = "2"
    stack.extra_env["DERIBIT_MAX_RETRIES"] = "0"
    # Writes that are never held make the repair's bound on pending writes 16 s.
    stack.extra_env["DERIBIT_TIMEOUT_SECONDS"] = "1"
    stack.extra_env["INGEST_MAX_WRITE_DELAY_SECONDS"] = "0"
    worker = stack.worker()
    stack.beat()
    await wait_for_rows(stack, per_ticker=2, timeout=30)
    stack.sim.faults("btc_usd", outage=True)
    await wait_for_log(worker, '"ticker failed"', count=3)
    stack.sim.reset()

    async def repaired() -> bool:
        rows = await stack.source_counts()
        return rows.get(("btc_usd", "backfill"), 0) >= 3

    # The gap is repaired once its slots are 16 s old.
    try:
        await wait_until_async(repaired, 60, interval=0.5, what="the repair job to back-fill btc_usd")
    except TimeoutError as timeout:
        # What the repairs saw, for a run that fails where nobody watched it.
        lines = worker.output.splitlines()
        seen = [line for line in lines if "repair" in line or '"ticker": "btc_usd"' in line]
        raise AssertionError(f"{timeout}; the worker's last repairs:\n" + "\n".join(seen[-20:])) from timeout
    assert_one_row_per_slot(await stack.rows(), stack.interval)
    assert '"backfill finished"' in worker.output


async def test_two_workers_and_two_api_processes_share_one_database(stack: CeleryStack) -> None:
    """Scale-out: two workers never store a slot twice; an API reading through
    DATABASE_READ_URL alone (a replica's place) serves what the other API serves."""
    stack.worker("w1")
    stack.worker("w2")
    beat = stack.beat()
    writer_view = ApiServer.command(
        "api", {"DATABASE_URL": stack.db_url, "TICKERS": ",".join(TICKERS)}, stack.tmp
    )
    reader_view = ApiServer.command(
        "api", {"DATABASE_READ_URL": stack.db_url, "TICKERS": ",".join(TICKERS)}, stack.tmp
    )
    try:
        await wait_for_rows(stack, per_ticker=5, timeout=40)
        beat.stop()
        await wait_for_no_task(stack)  # a tick already published finishes
        rows = await stack.rows()
        assert_one_row_per_slot(rows, stack.interval)
        for ticker in TICKERS:
            ours, theirs = (
                view.get("/prices", ticker=ticker, limit=1000).json() for view in (writer_view, reader_view)
            )
            assert ours == theirs
            assert len(ours) == sum(1 for each, _, _ in rows if each == ticker)
        assert "DATABASE_READ_URL" not in reader_view.output  # no start-up complaint
        assert "Traceback" not in writer_view.output + reader_view.output
    finally:
        writer_view.stop()
        reader_view.stop()
