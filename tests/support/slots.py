"""Choosing a slot a test can finish in."""

import asyncio
import time

from crypto_client.domain import current_slot


async def roomy_slot(interval: int = 60, room: float = 10) -> int:
    """The current slot, or the next one when fewer than `room` seconds of this one are
    left: a tick started in it is never `late` merely because the test ran at a slot's end."""
    slot = current_slot(interval)
    if slot + interval - time.time() < room:
        # A wait for a known time (the slot boundary), not for a condition.
        await asyncio.sleep(max(0.0, slot + interval - time.time()))
        slot = current_slot(interval)
    return slot
