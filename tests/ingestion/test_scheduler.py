"""The embedded scheduler's timing: one run per slot, each within its own slot."""

import asyncio
import time
from itertools import pairwise

from crypto_client.ingestion.embedded_scheduler import IntervalScheduler


async def test_runs_every_slot_and_skips_slots_it_slept_through() -> None:
    runs: list[tuple[int, float]] = []

    async def record(slot: int) -> None:
        runs.append((slot, time.time()))

    scheduler = IntervalScheduler(1, record)
    scheduler.start()
    await asyncio.sleep(2.2)
    time.sleep(3.2)  # the event loop is blocked, as on a suspended host
    await asyncio.sleep(2.2)
    await scheduler.stop()

    slots = [slot for slot, _ in runs]
    assert len(slots) == len(set(slots)), "a slot ran twice"
    assert slots == sorted(slots)
    for slot, started in runs:
        assert started - slot < 1.0, f"slot {slot} ran {started - slot:.1f}s after it started"
    assert len(runs) >= 4  # before and after the stall
    assert max(b - a for a, b in pairwise(slots)) >= 3  # the stalled slots were skipped
