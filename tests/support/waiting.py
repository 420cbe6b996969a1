"""Waiting for a condition instead of sleeping and hoping: a loaded machine only waits longer."""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call `condition` until it returns something truthy (errors count as not yet); return it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], Awaitable[T]], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """`wait_until` for an async condition; the last error is kept for the timeout message."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = await condition()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        await asyncio.sleep(interval)
