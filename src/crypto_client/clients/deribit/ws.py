"""Deribit's WebSocket price stream: `deribit_price_index.{index_name}` notifications as
observations, kept alive through heartbeats, a watchdog and reconnects.

Discipline (as cryptofeed's feed handlers keep it): ask for heartbeats and answer every
`test_request`; treat silence longer than `stall_seconds` as a dead connection (a half-open
TCP connection shows nothing else); reconnect forever with capped, jittered exponential
backoff, and subscribe again; check the subscribe answer, since Deribit drops unknown
channels without an error.
"""

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, WebSocketException

from crypto_client import metrics
from crypto_client.clients.deribit.rpc import (
    PRICE_INDEX_CHANNEL,
    decode_message,
    parse_index_notification,
    parse_subscription,
)
from crypto_client.clients.source import Observation
from crypto_client.logging import RateLimitedLog
from crypto_client.origin import SIMULATOR_HEADER, origin_of

log = structlog.get_logger(__name__)

OnObservation = Callable[[Observation], Awaitable[None]]
_MAX_BACKOFF_SECONDS = 30.0
# Deribit's frames are small; a bigger one is refused by the protocol (close code 1009), and
# the connection is made again.
MAX_FRAME_BYTES = 2**20
# How long before its timestamp a notification can have been sent, for the clock rule: the
# index is computed, then published (the observation window is [timestamp - this, received]).
_PUBLISH_WINDOW_SECONDS = 2.0
_FRAME_EXCERPT_CHARS = 200


class StreamStalledError(Exception):
    """Nothing arrived for longer than the watchdog allows."""


# What ends a connection and is answered by connecting again; anything else is a bug.
_CONNECTION_FAILURES = (OSError, TimeoutError, StreamStalledError, WebSocketException, InvalidHandshake)


class DeribitStream:
    def __init__(
        self,
        url: str,
        *,
        heartbeat_seconds: int = 10,
        stall_seconds: float = 30.0,
        backoff_seconds: float = 0.5,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self._heartbeat = heartbeat_seconds
        self._stall = stall_seconds
        self._backoff = backoff_seconds
        self._open_timeout = open_timeout
        self._ids = itertools.count(1)
        # Failed connections since the last session that subscribed and delivered a price.
        self._failures = 0
        self._subscribed: frozenset[str] = frozenset()
        self._skipped = RateLimitedLog(log)
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.prices = 0  # price notifications delivered, over every session
        # Whether the last handshake was the simulator's; None before any.
        self._simulator: bool | None = None

    @property
    def answered(self) -> bool:
        return self._simulator is not None

    @property
    def origin(self) -> str:
        """The origin of this stream's prices (see `crypto_client.origin`)."""
        return origin_of(self.url, simulator=bool(self._simulator))

    def _connection(self) -> connect:
        """One connection to the stream (an async context manager)."""
        return connect(
            self.url, open_timeout=self._open_timeout, ping_interval=None, max_size=MAX_FRAME_BYTES
        )

    async def run(self, tickers: Sequence[str], on_observation: OnObservation) -> None:
        """Stream `tickers` into `on_observation` until cancelled. An error other than the
        connection's own ends it (the runner restarts it)."""
        try:
            while True:
                try:
                    async with self._connection() as websocket:
                        handshake = websocket.response
                        self._simulator = handshake is not None and SIMULATOR_HEADER in handshake.headers
                        await self._session(websocket, tickers, on_observation)
                except _CONNECTION_FAILURES as exc:
                    self._disconnected()
                    metrics.STREAM_RECONNECTS.inc()
                    wait = random.uniform(0, min(_MAX_BACKOFF_SECONDS, self._backoff * 2**self._failures))
                    self._failures = min(self._failures + 1, 16)
                    self.reconnects += 1
                    log.warning(
                        "price stream disconnected, reconnecting",
                        url=self.url,
                        cause=f"{type(exc).__name__}: {exc}",
                        attempt=self._failures,
                        wait_seconds=round(wait, 2),
                    )
                    await asyncio.sleep(wait)
        finally:
            self._disconnected()

    def _disconnected(self) -> None:
        self.connected.clear()
        metrics.STREAM_CONNECTED.set(0)

    async def _session(
        self, websocket: ClientConnection, tickers: Sequence[str], on_observation: OnObservation
    ) -> None:
        self._subscribed = frozenset()
        await self._call(websocket, "public/set_heartbeat", {"interval": self._heartbeat})
        wanted = [PRICE_INDEX_CHANNEL + ticker for ticker in tickers]
        accepted = await self._call(websocket, "public/subscribe", {"channels": wanted})
        answered = accepted if isinstance(accepted, list) else []
        self._subscribed = frozenset(wanted) & {channel for channel in answered if isinstance(channel, str)}
        refused = sorted(set(wanted) - self._subscribed)
        if refused:
            log.error("price stream channels refused", channels=refused)
        self.connected.set()
        metrics.STREAM_CONNECTED.set(1)
        log.info("price stream subscribed", url=self.url, channels=len(self._subscribed))
        while True:
            message = await self._receive(websocket)
            if message is not None:
                await self._handle(websocket, message, on_observation)

    async def _receive(self, websocket: ClientConnection) -> dict[str, Any] | None:
        """The next frame as a JSON object; None for a frame that is not one (logged)."""
        try:
            async with asyncio.timeout(self._stall):
                raw = await websocket.recv()
        except TimeoutError:
            raise StreamStalledError(f"nothing received for {self._stall:g} s") from None
        if isinstance(raw, bytes):
            self._skip("binary frame", raw)  # Deribit's frames are text
            return None
        message = decode_message(raw)
        if message is None:
            self._skip("not a JSON object (or nested too deep)", raw)
        return message

    def _skip(self, reason: str, frame: object, kind: str = "malformed", **context: object) -> None:
        """Count and log (rate-limited per reason: `reason` is one of a few fixed texts) a frame
        that is not used."""
        metrics.STREAM_MESSAGES.labels(kind).inc()
        excerpt = frame[:_FRAME_EXCERPT_CHARS] if isinstance(frame, str | bytes) else frame
        self._skipped.warning(
            reason,
            "price stream frame skipped",
            reason=reason,
            url=self.url,
            **context,
            **({"frame_bytes": len(frame)} if isinstance(frame, str | bytes) else {}),
            frame=repr(excerpt)[:_FRAME_EXCERPT_CHARS],
        )

    async def _handle(
        self, websocket: ClientConnection, message: dict[str, Any], on_observation: OnObservation
    ) -> None:
        if message.get("method") == "heartbeat":
            params = message.get("params")
            if not isinstance(params, dict):
                self._skip("heartbeat without a params object", message)
                return
            metrics.STREAM_MESSAGES.labels("heartbeat").inc()
            if params.get("type") == "test_request":
                await self._send(websocket, "public/test", {})
            return
        try:
            subscription = parse_subscription(message)
            if subscription is None:
                metrics.STREAM_MESSAGES.labels("answer").inc()
                return
            channel, data = subscription
            if channel not in self._subscribed:
                self._skip("notification of a channel never subscribed", message, "unsubscribed")
                return
            notification = parse_index_notification(channel, data)
        except ValueError as exc:
            self._skip("malformed notification", message, error=str(exc))
            return
        metrics.STREAM_MESSAGES.labels("price").inc()
        self.prices += 1
        self._failures = 0  # this session subscribed and delivers: the next drop reconnects at once
        received = time.time()
        await on_observation(
            Observation(
                ticker=notification.index_name,
                price=notification.price,
                server_time_us=notification.timestamp * 1000,
                sent_at=received - _PUBLISH_WINDOW_SECONDS,
                received_at=received,
            )
        )

    async def _call(self, websocket: ClientConnection, method: str, params: dict[str, Any]) -> Any:
        """Send a request and wait for its answer (nothing else arrives before a subscribe)."""
        request_id = await self._send(websocket, method, params)
        while True:
            message = await self._receive(websocket)
            if message is None or message.get("id") != request_id:
                continue
            if "error" in message:
                raise WebSocketException(f"{method} refused: {message['error']}")
            return message.get("result")

    async def _send(self, websocket: ClientConnection, method: str, params: dict[str, Any]) -> int:
        request_id = next(self._ids)
        await websocket.send(
            f'{{"jsonrpc":"2.0","id":{request_id},"method":"{method}","params":{_json(params)}}}'
        )
        return request_id


def _json(params: dict[str, Any]) -> str:

    return orjson.dumps(params).decode()
