"""The simulator's WebSocket, `/ws/api/v2`: Deribit's JSON-RPC with subscriptions to
`deribit_price_index.{index_name}`, heartbeats and `test_request`s, and the stream's faults."""

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from crypto_client import exact_json
from crypto_client.sim.served import ServedLog

log = structlog.get_logger(__name__)

CHANNEL_PREFIX = "deribit_price_index."
MIN_HEARTBEAT_SECONDS = 10  # Deribit's floor for public/set_heartbeat

# What the stream needs of the simulator: its faults, its prices and its clock.
PriceOf = Callable[[str], Any]
ClockMs = Callable[[str], int]


class StreamSession:
    """One client connection: its channels, its heartbeat, and the notifications it gets."""

    def __init__(
        self,
        websocket: WebSocket,
        faults: Callable[[], Any],
        price_of: PriceOf,
        clock_ms: ClockMs,
        record: ServedLog,
    ) -> None:
        self.websocket = websocket
        self._record = record
        self._faults = faults
        self._price_of = price_of
        self._clock_ms = clock_ms
        self.channels: list[str] = []
        self._heartbeat: float | None = None
        self._awaiting_test = False
        self._disconnects = faults().ws_disconnects

    async def run(self, known: Callable[[str], bool]) -> None:
        pushing = asyncio.create_task(self._push())
        try:
            while True:
                raw = await self.websocket.receive_text()
                if self._faults().ws_stall:
                    continue  # a half-open connection: nothing comes back
                await self._answer(raw, known)
        except WebSocketDisconnect:
            pass
        finally:
            pushing.cancel()

    async def _answer(self, raw: str, known: Callable[[str], bool]) -> None:
        try:
            request = orjson.loads(raw)
            method, request_id = request["method"], request.get("id")
            params = request.get("params") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            await self._send({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}})
            return
        result: Any
        if method == "public/subscribe":
            dropped = set(self._faults().ws_drop_channels)
            accepted = [
                channel
                for channel in params.get("channels", [])
                if isinstance(channel, str)
                and channel.startswith(CHANNEL_PREFIX)
                and known(channel.removeprefix(CHANNEL_PREFIX))
                and channel not in dropped
            ]
            self.channels += [channel for channel in accepted if channel not in self.channels]
            result = accepted  # unknown channels are dropped silently, as Deribit does
        elif method == "public/unsubscribe":
            gone = set(params.get("channels", []))
            self.channels = [channel for channel in self.channels if channel not in gone]
            result = sorted(gone)
        elif method == "public/set_heartbeat":
            interval = params.get("interval")
            if not isinstance(interval, int | float) or interval < MIN_HEARTBEAT_SECONDS:
                error = {"code": -32602, "message": "Invalid params", "data": {"param": "interval"}}
                await self._send({"jsonrpc": "2.0", "id": request_id, "error": error})
                return
            self._heartbeat = float(interval)
            result = "ok"
        elif method == "public/test":
            self._awaiting_test = False
            result = {"version": "1.2.26"}
        else:
            await self._send(
                {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}}
            )
            return
        await self._send({"jsonrpc": "2.0", "id": request_id, "result": result})

    async def _push(self) -> None:
        next_heartbeat = time.monotonic()
        while True:
            faults = self._faults()
            # On the clock's whole multiples of the interval, like an index recomputed on a
            # schedule: a notification's send time is then known from its timestamp.
            interval = faults.stream_interval_ms / 1000
            await asyncio.sleep(interval - time.time() % interval)
            if faults.ws_disconnects != self._disconnects:
                await self.websocket.close(code=1011)  # the connection drops, as on a restart
                return
            if faults.ws_stall:
                continue
            if self._heartbeat is not None and time.monotonic() >= next_heartbeat:
                if self._awaiting_test:
                    # Deribit closes a connection whose test_request went unanswered.
                    await self.websocket.close(code=1000, reason="test_request not answered")
                    return
                self._awaiting_test = True
                await self._send(
                    {"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}}
                )
                next_heartbeat = time.monotonic() + self._heartbeat * faults.heartbeat_scale
            for channel in self.channels:
                await self._notify(channel)

    async def _notify(self, channel: str) -> None:
        faults = self._faults()
        if faults.ws_malformed_next > 0:
            faults.ws_malformed_next -= 1
            await self.websocket.send_text('{"jsonrpc":"2.0","method":"subscription","params":{"chan')
            return
        name = channel.removeprefix(CHANNEL_PREFIX)
        data = {"index_name": name, "price": self._price_of(name), "timestamp": self._clock_ms(name)}
        await self._send(
            {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
        )
        self._record.add("ws", name, data["price"], timestamp=data["timestamp"])

    async def _send(self, message: dict[str, Any]) -> None:
        await self.websocket.send_text(exact_json.dumps(message).decode())


async def serve_stream(
    websocket: WebSocket,
    faults: Callable[[], Any],
    price_of: PriceOf,
    clock_ms: ClockMs,
    known: Callable[[str], bool],
    record: ServedLog,
) -> None:
    if faults().ws_refuse:
        await websocket.close(code=1013)  # before accepting: the handshake is refused
        return
    await websocket.accept()
    await StreamSession(websocket, faults, price_of, clock_ms, record).run(known)
