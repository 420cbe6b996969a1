"""Waiting for a condition instead of sleeping and hoping: a loaded machine only waits longer."""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

# A check is an HTTP request, a query or a log file read: a long wait need not make one twenty
# times a second, and a condition met at once is still seen at once.
_FIRST_INTERVAL = 0.02
_LONGEST_INTERVAL = 0.1


def _pauses(longest: float) -> Iterator[float]:
    """Seconds between checks: short at first, growing to `longest`."""
    pause = min(_FIRST_INTERVAL, longest)
    while True:
        yield pause
        pause = min(pause * 1.5, longest)


def wait_until(
    condition: Callable[[], T], timeout: float, interval: float = _LONGEST_INTERVAL, what: str = "condition"
) -> T:
    """Call `condition` until it returns something truthy (errors count as not yet); return it.
    The checks are at most `interval` apart."""
    deadline = time.monotonic() + timeout
    for pause in _pauses(interval):
        with contextlib.suppress(Exception):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
    raise AssertionError("unreachable")


async def wait_until_async(
    condition: Callable[[], Awaitable[T]],
    timeout: float,
    interval: float = _LONGEST_INTERVAL,
    what: str = "condition",
) -> T:
    """`wait_until` for an async condition; the last error is kept for the timeout message."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    for pause in _pauses(interval):
        try:
            result = await condition()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")
