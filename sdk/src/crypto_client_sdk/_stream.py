"""The price stream free of I/O, shared by both clients: Server-Sent Events parsing, and the
resume point and retry waits across disconnects."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from crypto_client_sdk._protocol import Params, RetryPolicy, decode_json, price
from crypto_client_sdk.errors import ProtocolError
from crypto_client_sdk.models import Price

STREAM_PATH = "/prices/stream"


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None


class SseDecoder:
    """The event stream format of the HTML standard (9.2.6), line by line: the lines come
    already split on CR, LF or CRLF."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def disconnected(self) -> None:
        """An event cut off by the connection's end is never dispatched."""
        self._reset()

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
            self._reset()
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None


class PriceStream:
    """One `stream()` call's state across its connections: the tickers, the last event id
    received (what a reconnect resumes after) and how long to wait before reconnecting."""

    # The server sends a comment every 15 s: three missed mean the connection is dead.
    READ_TIMEOUT_SECONDS = 45.0

    def __init__(self, tickers: Iterable[str] | str, last_event_id: int | str | None, policy: RetryPolicy):
        self.params: Params = {"ticker": [tickers] if isinstance(tickers, str) else list(tickers)}
        self.decoder = SseDecoder()
        self.decoder.last_event_id = None if last_event_id is None else str(last_event_id)
        # A live stream is meant to run for days: it never gives up on a server that asks to wait.
        self.policy = replace(policy, max_retries=None)
        self.failures = 0

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.decoder.last_event_id:
            headers["Last-Event-ID"] = self.decoder.last_event_id
        return headers

    def opened(self) -> None:
        self.failures = 0

    def refused(self, status: int, headers: Mapping[str, str], content: bytes, url: str) -> float:
        """The wait before the next try after a non-200 answer; raises a non-retryable one."""
        wish = self.policy.after_answer(status, headers, content, url, self.failures)
        if wish is None:
            raise ProtocolError(f"{url} answered {status} but sent no event stream")
        self.failures += 1
        return wish

    def lost(self) -> float:
        """The wait before reconnecting after the connection ended or failed."""
        self.decoder.disconnected()
        self.failures += 1
        if self.failures == 1 and self.decoder.retry_ms is not None:
            return self.decoder.retry_ms / 1000
        return self.policy.backoff(self.failures - 1)

    def feed(self, line: str) -> Price | None:
        event = self.decoder.feed(line)
        if event is None or event.event != "price":
            return None
        try:
            row = decode_json(event.data.encode())
            return price(row, None if event.id is None else int(event.id))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not a price event: {event!r}") from exc
