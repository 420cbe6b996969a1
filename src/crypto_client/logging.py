"""One logging set-up for every process: API, Celery worker and beat, simulator and CLI.

Application code logs through structlog with key-value context; records from the standard
library (uvicorn, Celery, SQLAlchemy) go through the same formatter, so every line of every
process looks alike: human text by default, one JSON object per line with `LOG_FORMAT=json`.
"""

import logging
import re
import sys
import time
from typing import Literal

import structlog
from structlog.typing import EventDict, Processor

_SHARED_PROCESSORS: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _drop_color_message(_logger: object, _name: str, event: EventDict) -> EventDict:
    # uvicorn attaches an ANSI-coloured copy of each message; the message itself is enough.
    event.pop("color_message", None)
    return event


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _escape_control_characters(_logger: object, _name: str, event: EventDict) -> EventDict:
    # A request path or a Deribit message may carry terminal escapes; in a text log they would
    # reach whoever tails it. (JSON escapes them by itself.)
    return {
        key: _escape(value) if isinstance(value, str) and key != "exception" else value
        for key, value in event.items()
    }


def setup_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    escape: list[Processor] = [_escape_control_characters] if fmt == "text" else []

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_color_message,
            structlog.processors.format_exc_info,
            *escape,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn and Celery install their own handlers; route them through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    # The API writes its own request line; uvicorn's access log would say it twice.
    logging.getLogger("uvicorn.access").disabled = True
    # A DEBUG level should show our debugging, not every HTTP frame.
    for noisy in ("httpx", "httpcore", "hpack", "asyncio", "aiosqlite", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class RateLimitedLog:
    """Warnings that a peer can provoke at will (a stream of bad frames), at most one line per
    `key` every `every_seconds`; the next line says how many were left out in between."""

    def __init__(self, logger: structlog.stdlib.BoundLogger, every_seconds: float = 10.0) -> None:
        self._log = logger
        self._every = every_seconds
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, key: str, event: str, **context: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        self._log.warning(event, **context, **({"similar_left_out": left_out} if left_out else {}))
