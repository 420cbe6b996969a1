"""Choosing a slot a test can finish in."""

import asyncio
import time

from crypto_client.domain import current_slot


def _wait_for_room(interval: int, room: float) -> float:
    """Seconds until the next slot starts when fewer than `room` are left in this one, else 0."""
    left = current_slot(interval) + interval - time.time()
    return max(0.0, left) if left < room else 0.0


async def roomy_slot(interval: int = 60, room: float = 10) -> int:
    """The current slot, or the next one when fewer than `room` seconds of this one are
    left: a tick started in it is never `late` merely because the test ran at a slot's end."""
    # A wait for a known time (the slot boundary), not for a condition.
    await asyncio.sleep(_wait_for_room(interval, room))
    return current_slot(interval)


def roomy_slot_blocking(interval: int, room: float) -> int:
    """`roomy_slot` for a test that starts processes from synchronous code."""
    time.sleep(_wait_for_room(interval, room))
    return current_slot(interval)
