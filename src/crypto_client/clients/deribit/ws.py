"""Deribit's WebSocket price stream: `deribit_price_index.{index_name}` notifications as
observations, kept alive through heartbeats, a watchdog and reconnects.

Discipline (as cryptofeed's feed handlers keep it): ask for heartbeats and answer every
`test_request`; treat silence longer than `stall_seconds` as a dead connection (a half-open
TCP connection shows nothing else); reconnect forever with capped, jittered exponential
backoff, and subscribe again; check the subscribe answer, since Deribit drops unknown
channels without an error.
"""

import asyncio
import contextlib
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
from crypto_client.clients.deribit.budget import SharedConnectionBudget
from crypto_client.clients.deribit.errors import TransientDeribitError
from crypto_client.clients.deribit.rpc import (
    PRICE_INDEX_CHANNEL,
    decode_message,
    parse_index_notification,
)
from crypto_client.clients.source import Observation

log = structlog.get_logger(__name__)

OnObservation = Callable[[Observation], Awaitable[None]]
_MAX_BACKOFF_SECONDS = 30.0
# How long before its timestamp a notification can have been sent, for the clock rule: the
# index is computed, then published (the observation window is [timestamp - this, received]).
_PUBLISH_WINDOW_SECONDS = 2.0


class StreamStalledError(Exception):
    """Nothing arrived for longer than the watchdog allows."""


class DeribitStream:
    def __init__(
        self,
        url: str,
        *,
        heartbeat_seconds: int = 10,
        stall_seconds: float = 30.0,
        backoff_seconds: float = 0.5,
        open_timeout: float = 10.0,
        budget: SharedConnectionBudget | None = None,
    ) -> None:
        self.url = url
        # The WebSocket counts against Deribit's per-IP cap like any HTTP connection.
        self._budget = budget
        self._heartbeat = heartbeat_seconds
        self._stall = stall_seconds
        self._backoff = backoff_seconds
        self._open_timeout = open_timeout
        self._ids = itertools.count(1)
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def run(self, tickers: Sequence[str], on_observation: OnObservation) -> None:
        """Stream `tickers` into `on_observation` until cancelled."""
        failures = 0
        while True:
            slot = (
                self._budget.lease(wait_seconds=self._open_timeout)
                if self._budget is not None
                else contextlib.nullcontext()
            )
            try:
                async with (
                    slot,
                    connect(
                        self.url, open_timeout=self._open_timeout, ping_interval=None, max_size=2**20
                    ) as websocket,
                ):
                    await self._session(websocket, tickers, on_observation)
            except (
                OSError,
                TimeoutError,
                StreamStalledError,
                WebSocketException,
                InvalidHandshake,
                TransientDeribitError,
            ) as exc:
                self.connected.clear()
                metrics.STREAM_CONNECTED.set(0)
                metrics.STREAM_RECONNECTS.inc()
                wait = random.uniform(0, min(_MAX_BACKOFF_SECONDS, self._backoff * 2**failures))
                failures = min(failures + 1, 16)
                self.reconnects += 1
                log.warning(
                    "price stream disconnected, reconnecting",
                    url=self.url,
                    cause=f"{type(exc).__name__}: {exc}",
                    attempt=failures,
                    wait_seconds=round(wait, 2),
                )
                await asyncio.sleep(wait)
            else:
                failures = 0

    async def _session(
        self, websocket: ClientConnection, tickers: Sequence[str], on_observation: OnObservation
    ) -> None:
        await self._call(websocket, "public/set_heartbeat", {"interval": self._heartbeat})
        wanted = [PRICE_INDEX_CHANNEL + ticker for ticker in tickers]
        accepted = await self._call(websocket, "public/subscribe", {"channels": wanted})
        refused = sorted(set(wanted) - set(accepted if isinstance(accepted, list) else []))
        if refused:
            log.error("price stream channels refused", channels=refused)
        self.connected.set()
        metrics.STREAM_CONNECTED.set(1)
        log.info("price stream subscribed", url=self.url, channels=len(wanted) - len(refused))
        while True:
            message = await self._receive(websocket)
            if message is not None:
                await self._handle(websocket, message, on_observation)

    async def _receive(self, websocket: ClientConnection) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._stall):
                raw = await websocket.recv()
        except TimeoutError:
            raise StreamStalledError(f"nothing received for {self._stall:g} s") from None
        message = decode_message(raw)
        if message is None:
            metrics.STREAM_MESSAGES.labels("malformed").inc()
            log.warning("price stream sent a malformed frame, skipped", frame=str(raw)[:200])
        return message

    async def _handle(
        self, websocket: ClientConnection, message: dict[str, Any], on_observation: OnObservation
    ) -> None:
        if message.get("method") == "heartbeat":
            metrics.STREAM_MESSAGES.labels("heartbeat").inc()
            if (message.get("params") or {}).get("type") == "test_request":
                await self._send(websocket, "public/test", {})
            return
        try:
            notification = parse_index_notification(message)
        except ValueError as exc:
            log.warning("price stream notification skipped", error=str(exc))
            return
        metrics.STREAM_MESSAGES.labels("answer" if notification is None else "price").inc()
        if notification is not None:
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
