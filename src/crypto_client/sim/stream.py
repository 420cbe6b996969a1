"""The simulator's WebSocket, `/ws/api/v2`: Deribit's JSON-RPC with subscriptions to
`deribit_price_index.{index_name}`, heartbeats and `test_request`s, and the stream's faults.
Every connection is recorded (opened, subscribed, closed, notifications sent), so a test
measures reconnects by the simulator's clock."""

import asyncio
import time
from collections.abc import Callable, MutableSequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from crypto_client import exact_json
from crypto_client.sim.faults import HostileFrame
from crypto_client.sim.served import ServedLog

log = structlog.get_logger(__name__)

CHANNEL_PREFIX = "deribit_price_index."
MIN_HEARTBEAT_SECONDS = 10  # Deribit's floor for public/set_heartbeat

# What the stream needs of the simulator: its faults, its prices and its clock.
PriceOf = Callable[[str], Any]
ClockMs = Callable[[str], int]

_TRUNCATED = '{"jsonrpc":"2.0","method":"subscription","params":{"chan'
_HUGE_FRAME_BYTES = 2 * 2**20
_DEEP_NESTING_LEVELS = 100_000


@dataclass
class ConnectionRecord:
    """One WebSocket connection as the simulator saw it (UNIX seconds)."""

    opened: float
    subscribed: float | None = None  # its first accepted subscribe
    closed: float | None = None
    notifications: int = 0  # price notifications of its subscribed channels

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hostile_frame(kind: HostileFrame, channel: str, timestamp_ms: int) -> str | bytes:
    """The text (or bytes) of one hostile frame, aimed at `channel` where it has one."""
    name = channel.removeprefix(CHANNEL_PREFIX)

    def notification(data: str) -> str:
        return f'{{"jsonrpc":"2.0","method":"subscription","params":{{"channel":"{channel}","data":{data}}}}}'

    match kind:
        case HostileFrame.TRUNCATED:
            return _TRUNCATED
        case HostileFrame.NOT_JSON:
            return "<html><body>502 Bad Gateway</body></html>"
        case HostileFrame.NOT_AN_OBJECT:
            return f'[{{"channel":"{channel}"}}]'
        case HostileFrame.BINARY:
            return b"\xff\xfe\x00\x81 not a text frame"
        case HostileFrame.DEEP_NESTING:
            return notification("[" * _DEEP_NESTING_LEVELS + "]" * _DEEP_NESTING_LEVELS)
        case HostileFrame.HUGE:
            return notification(f'{{"index_name":"{name}","pad":"{"x" * _HUGE_FRAME_BYTES}"}}')
        case HostileFrame.HEARTBEAT_PARAMS_NOT_OBJECT:
            return '{"jsonrpc":"2.0","method":"heartbeat","params":["test_request"]}'
        case HostileFrame.TIMESTAMP_OVERFLOW:
            return notification(f'{{"index_name":"{name}","price":43000.5,"timestamp":1e400}}')
        case HostileFrame.STRING_PRICE:
            return notification(f'{{"index_name":"{name}","price":"43000.5","timestamp":{timestamp_ms}}}')
        case HostileFrame.INDEX_NAME_MISMATCH:
            return notification(f'{{"index_name":"{name}x","price":43000.5,"timestamp":{timestamp_ms}}}')


class StreamSession:
    """One client connection: its channels, its heartbeat, and the notifications it gets."""

    def __init__(
        self,
        websocket: WebSocket,
        faults: Callable[[], Any],
        price_of: PriceOf,
        clock_ms: ClockMs,
        known: Callable[[str], bool],
        record: ConnectionRecord,
        served: ServedLog,
    ) -> None:
        self.websocket = websocket
        self._known = known
        self._served = served
        self._faults = faults
        self._price_of = price_of
        self._clock_ms = clock_ms
        self.record = record
        self.channels: list[str] = []
        self._heartbeat: float | None = None
        self._awaiting_test = False
        self._disconnects = faults().ws_disconnects

    async def run(self) -> None:
        pushing = asyncio.create_task(self._push())
        try:
            while True:
                raw = await self.websocket.receive_text()
                if self._faults().ws_stall:
                    continue  # a half-open connection: nothing comes back
                await self._answer(raw)
        except WebSocketDisconnect:
            pass
        finally:
            pushing.cancel()
            self.record.closed = self.record.closed or time.time()

    async def _answer(self, raw: str) -> None:
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
                and self._known(channel.removeprefix(CHANNEL_PREFIX))
                and channel not in dropped
            ]
            self.channels += [channel for channel in accepted if channel not in self.channels]
            if accepted and self.record.subscribed is None:
                self.record.subscribed = time.time()
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
            dropped = faults.ws_drop_after and self.record.notifications >= faults.ws_drop_after
            if faults.ws_disconnects != self._disconnects or dropped:
                self.record.closed = time.time()
                await self.websocket.close(code=1011)  # the connection drops, as on a restart
                return
            if faults.ws_stall:
                continue
            if self._heartbeat is not None and time.monotonic() >= next_heartbeat:
                if self._awaiting_test:
                    # Deribit closes a connection whose test_request went unanswered.
                    self.record.closed = time.time()
                    await self.websocket.close(code=1000, reason="test_request not answered")
                    return
                self._awaiting_test = True
                await self._send(
                    {"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}}
                )
                next_heartbeat = time.monotonic() + self._heartbeat * faults.heartbeat_scale
            if not self.channels:
                continue  # the faults below ride along with a subscription's notifications
            await self._send_hostile(faults)
            for channel in self.channels:
                await self._notify(channel)
                self.record.notifications += 1
            for channel in faults.ws_unsubscribed_channels:
                if channel not in self.channels:
                    await self._notify_unsubscribed(channel)

    async def _send_hostile(self, faults: Any) -> None:
        hostile, faults.ws_hostile_next = faults.ws_hostile_next, ()
        for kind in hostile:
            frame = hostile_frame(kind, self.channels[0], self._clock_ms(self.channels[0]))
            log.info("sim sending a hostile frame", kind=str(kind))
            if isinstance(frame, bytes):
                await self.websocket.send_bytes(frame)
            else:
                await self.websocket.send_text(frame)

    async def _notify_unsubscribed(self, channel: str) -> None:
        name = channel.removeprefix(CHANNEL_PREFIX)
        if channel.startswith(CHANNEL_PREFIX) and self._known(name):
            await self._notify(channel)
        else:  # some other channel of Deribit's, or an index it does not have
            data = {"channel": channel, "data": {"index_name": name, "price": 1, "timestamp": 0}}
            await self._send({"jsonrpc": "2.0", "method": "subscription", "params": data})

    async def _notify(self, channel: str) -> None:
        faults = self._faults()
        if faults.ws_malformed_next > 0:
            faults.ws_malformed_next -= 1
            await self.websocket.send_text(_TRUNCATED)
            return
        name = channel.removeprefix(CHANNEL_PREFIX)
        data = {"index_name": name, "price": self._price_of(name), "timestamp": self._clock_ms(name)}
        await self._send(
            {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
        )
        self._served.add("ws", name, data["price"], timestamp=data["timestamp"])

    async def _send(self, message: dict[str, Any]) -> None:
        await self.websocket.send_text(exact_json.dumps(message).decode())


async def serve_stream(
    websocket: WebSocket,
    faults: Callable[[], Any],
    price_of: PriceOf,
    clock_ms: ClockMs,
    known: Callable[[str], bool],
    connections: MutableSequence[ConnectionRecord],
    served: ServedLog,
) -> None:
    if faults().ws_refuse:
        await websocket.close(code=1013)  # before accepting: the handshake is refused
        return
    await websocket.accept()
    record = ConnectionRecord(opened=time.time())
    connections.append(record)
    await StreamSession(websocket, faults, price_of, clock_ms, known, record, served).run()
