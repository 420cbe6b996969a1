"""What a command needs before it starts work, checked the same way by every command.

One-shot commands (`ingest`, `backfill`) stop at once with one line naming the setting.
Long-running ones (`worker`, `beat`, `stream`) wait, saying every few seconds what they wait
for and which setting names it, so that no start order is needed in a deployment; after
`STARTUP_WAIT_SECONDS` they give up with the same line. The API alone starts without its
database (it answers 503 until the database appears).
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from crypto_client.config import Settings, database_origin, setting_origin
from crypto_client.db.engine import database_problem, describe_database
from crypto_client.db.migrations import schema_problem

log = structlog.get_logger(__name__)

_REPORT_EVERY_SECONDS = 5.0
_BROKER_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class Need:
    """Something a command cannot work without: `problem()` says what is wrong, or None."""

    what: str
    setting: str
    problem: Callable[[], Awaitable[str | None]]

    def line(self, problem: str) -> str:
        return f"cannot use {self.what} ({self.setting}): {problem}"


def database_need(settings: Settings, *, reading: bool = False, migrated: bool = True) -> Need:
    """The writers' database (the API's, when `reading`), reachable and, when `migrated`, at
    this version's schema revision."""
    url = settings.database_read_url_value if reading else settings.database_url_value

    async def problem() -> str | None:
        return await database_problem(url) or (await schema_problem(url) if migrated else None)

    return Need(f"the database {describe_database(url)}", database_origin(settings, reading=reading), problem)


def broker_need(settings: Settings) -> Need:
    url = settings.celery_broker_url.get_secret_value()

    async def problem() -> str | None:
        import redis.asyncio as redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=_BROKER_TIMEOUT_SECONDS, socket_timeout=_BROKER_TIMEOUT_SECONDS
        )
        try:
            await client.ping()
        except Exception as exc:  # redis raises its own errors and OS ones alike
            return f"no answer from Redis: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        finally:
            await client.aclose()
        return None

    return Need(f"the broker {_redacted(url)}", setting_origin(settings, "celery_broker_url"), problem)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


async def first_problem(needs: Sequence[Need]) -> str | None:
    """The first need that is not met, as one line; None when all are."""
    for need in needs:
        if (problem := await need.problem()) is not None:
            return need.line(problem)
    return None


class StartupError(Exception):
    """A need not met: `str()` is the one line to print, `hint` what to try."""

    def __init__(self, line: str, hint: str) -> None:
        super().__init__(line)
        self.hint = hint


def require(needs: Sequence[Need], *, wait_seconds: float = 0) -> None:
    """Return once every need is met, waiting up to `wait_seconds`; else `StartupError`.
    Blocking: call it before the process's event loop exists."""
    problem = asyncio.run(wait_until_ready(needs, wait_seconds))
    if problem is None:
        return
    gave_up = f" (gave up after STARTUP_WAIT_SECONDS={wait_seconds:g})" if wait_seconds else ""
    hint = "check the setting, or run `crypto-client serve` without it for a local SQLite file"
    if "(in .env)" in problem:
        hint = "the .env file sets it (docker compose's values?); change or remove it for a local run"
    raise StartupError(problem + gave_up, hint)


async def wait_until_ready(needs: Sequence[Need], wait_seconds: float) -> str | None:
    """Wait up to `wait_seconds` for every need, logging what is missing every few seconds;
    None once all are met, else the last problem."""
    deadline = time.monotonic() + wait_seconds
    while True:
        problem = await first_problem(needs)
        if problem is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return problem
        log.warning(f"waiting: {problem}", gives_up_in_seconds=round(left))
        await asyncio.sleep(min(_REPORT_EVERY_SECONDS, left))
