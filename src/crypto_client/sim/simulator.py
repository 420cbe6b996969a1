"""The simulated Deribit: its methods' answers, the faults it injects, and what it counts;
`sim/app.py` serves it over HTTP and WebSocket."""

import asyncio
import bisect
import itertools
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

import orjson
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from crypto_client import exact_json
from crypto_client.sim.connections import ConnectionCount
from crypto_client.sim.faults import BAD_CHART_POINTS, ChartFault, FaultKind, FaultPlan, Faults
from crypto_client.sim.history import JsonRpcParamsError, TradeHistory
from crypto_client.sim.prices import PriceWalk
from crypto_client.sim.served import ServedLog
from crypto_client.sim.stream import ConnectionRecord

log = structlog.get_logger(__name__)

TIMEOUT_HOLD_SECONDS = 120.0
# get_index_chart_data: how far back each range reaches and how far apart its points are (ms).
CHART_RANGES: dict[str, tuple[int, int]] = {
    "1h": (3_600_000, 6_000),
    "1d": (86_400_000, 60_000),
    "2d": (172_800_000, 120_000),
    "1m": (30 * 86_400_000, 1_800_000),
    "1y": (365 * 86_400_000, 86_400_000),
    "all": (730 * 86_400_000, 86_400_000),
}
_SERVED_KEPT = 100_000  # served prices remembered per index, for the chart
_CONNECTIONS_KEPT = 1_000  # WebSocket connections remembered, newest last


async def _hold(seconds: float, client_left: Callable[[], Awaitable[bool]] | None) -> None:
    """Hold a request unanswered for `seconds`, or until its client gives up: a hung request
    of a departed client must not keep the simulator from stopping."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client_left is not None and await client_left():
            return
        await asyncio.sleep(0.2)


class JsonRpcError(Exception):
    """A JSON-RPC error answer, with the HTTP status Deribit sends it with."""

    def __init__(
        self, code: int, message: str, status: int = 400, data: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.data = data


class _DroppedResponse(Response):
    """Announces a body, sends part of it, and leaves: the server then closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"jsonrpc":"2.0","res', "more_body": True})


class Simulator:
    def __init__(self, seed: int = 0, faults: Faults | None = None, chart_step_scale: float = 1.0) -> None:
        self.walk = PriceWalk(seed)
        self.history = TradeHistory(self.walk, seed, time.time_ns() // 1_000_000)
        self.chart_step_scale = chart_step_scale
        # What get_index_price served, per index: (time ms, price), oldest first.
        self.served: dict[str, deque[tuple[int, Decimal | orjson.Fragment]]] = {}
        self.faults = FaultPlan(seed=seed, default=faults or Faults())
        self.requests: Counter[str] = Counter()
        self.record = ServedLog()
        self._sent_us_out: int | str = 0  # the last envelope's usOut, as sent
        self.ws_connections: deque[ConnectionRecord] = deque(maxlen=_CONNECTIONS_KEPT)
        self._frozen_us: dict[str | None, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        # Per JSON-RPC method: requests answered or failed, and how many were ever served at once.
        self.method_requests: Counter[str] = Counter()
        self.method_in_flight: Counter[str] = Counter()
        self.method_max_in_flight: Counter[str] = Counter()
        self._bad_points = itertools.cycle(BAD_CHART_POINTS)
        self.connections = ConnectionCount()
        self._methods: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "public/get_index_price": self._get_index_price,
            "public/get_index_price_names": lambda _params: self.walk.names,
            "public/get_supported_index_names": lambda _params: self.walk.names,
            "public/get_time": lambda _params: time.time_ns() // 1_000_000,
            "public/get_index_chart_data": self._get_index_chart_data,
            "public/test": lambda _params: {"version": "1.2.26"},
            "public/get_instruments": self.history.get_instruments,
            "public/get_last_trades_by_instrument_and_time": lambda params: self._get_trades(
                params, history_host=False
            ),
            "public/get_delivery_prices": lambda params: self.history.get_delivery_prices(
                params, now_ms=time.time_ns() // 1_000_000
            ),
        }
        # The history host: the same methods, with every trade since the start.
        self._history_methods = {
            **self._methods,
            "public/get_last_trades_by_instrument_and_time": lambda params: self._get_trades(
                params, history_host=True
            ),
        }

    def _get_trades(self, params: Mapping[str, Any], *, history_host: bool) -> dict[str, Any]:
        now_ms = time.time_ns() // 1_000_000
        answer = self.history.get_trades(params, now_ms=now_ms, history_host=history_host)
        if answer["trades"]:
            index = self.history.index_of(str(params["instrument_name"]))
            self.record.add_history(
                "trade", index, [(trade["timestamp"], trade["index_price"]) for trade in answer["trades"]]
            )
        return answer

    def _get_index_price(self, params: Mapping[str, Any]) -> dict[str, Decimal | orjson.Fragment]:
        name = params.get("index_name")
        if name is None:
            raise JsonRpcError(
                -32602, "Invalid params", data={"param": "index_name", "reason": "missing param"}
            )
        if not isinstance(name, str) or name not in self.walk:
            raise JsonRpcError(
                -32602, "Invalid params", data={"param": "index_name", "reason": "wrong format"}
            )
        price = self.serve_price(name)
        return {"estimated_delivery_price": price, "index_price": price}

    def serve_price(self, name: str) -> Decimal | orjson.Fragment:
        """The next price of `name` (its pinned text, or the walk's next step), remembered
        for the chart: HTTP answers and stream notifications alike."""
        pinned = self.walk.pinned.get(name)
        price = orjson.Fragment(pinned.encode()) if pinned is not None else self.walk.next_price(name)
        self.served.setdefault(name, deque(maxlen=_SERVED_KEPT)).append((time.time_ns() // 1_000_000, price))
        return price

    def _get_index_chart_data(self, params: Mapping[str, Any]) -> list[Any]:
        """One point per step of the range, oldest first: the first price served within the
        step (so the chart agrees with what get_index_price said), else a synthetic one."""
        name = params.get("index_name")
        if not isinstance(name, str) or name not in self.walk:
            raise JsonRpcError(
                -32602, "Invalid params", data={"param": "index_name", "reason": "wrong format"}
            )
        reach_and_step = CHART_RANGES.get(str(params.get("range")))
        if reach_and_step is None:
            raise JsonRpcError(
                -32602,
                "Invalid params",
                data={"param": "range", "reason": "must be one of " + ", ".join(CHART_RANGES)},
            )
        reach, step = reach_and_step
        step = max(1, round(step * self.chart_step_scale))
        now = time.time_ns() // 1_000_000
        fault = self.faults.draw_chart(name)
        if fault is not None:
            log.info(
                "sim injecting fault", fault=str(fault), method="public/get_index_chart_data", index=name
            )
        if fault is ChartFault.EMPTY:
            return []
        if fault is ChartFault.OUT_OF_WINDOW:
            now -= reach  # true points, of the window before the one asked for
        served = list(self.served.get(name, ()))
        times = [served_ms for served_ms, _ in served]
        points: list[Any] = []
        genuine: list[tuple[int, Any]] = []
        start = (now - reach) // step * step + step
        for bucket in range(start, now + 1, step):
            first = bisect.bisect_left(times, bucket)
            if first < len(times) and times[first] < bucket + step:
                point: tuple[int, Any] = served[first]
            else:
                point = (bucket, self.walk.price_at(name, bucket))
            if self.faults.draw_bad_point(name):
                points.append(self._bad_point(point))
            else:
                points.append(point)
                genuine.append(point)
        # A spoilt point is a fault, never one of the simulator's values: it is not recorded.
        self.record.add_history("chart", name, genuine)
        return points

    def _bad_point(self, point: tuple[int, Any]) -> Any:
        """`point` spoilt, each kind of bad point in turn."""
        ts_ms, price = point
        match next(self._bad_points):
            case "null_point":
                return None
            case "null_price":
                return (ts_ms, None)
            case "zero_price":
                return (ts_ms, 0)
            case "negative_price":
                return (ts_ms, Decimal("-1.5"))
            case _:  # "string_price"
                # A served price is kept as its JSON literal (a Fragment): dumping it gives the text.
                text = orjson.dumps(price).decode() if isinstance(price, orjson.Fragment) else str(price)
                return (ts_ms, text)

    async def answer(
        self,
        method: str,
        params: Mapping[str, Any],
        request_id: object = None,
        client_left: Callable[[], Awaitable[bool]] | None = None,
        *,
        history_host: bool = False,
    ) -> Response:
        index = params.get("index_name") if isinstance(params.get("index_name"), str) else None
        self.requests[index or method] += 1
        self.method_requests[method] += 1
        latency_ms, fault = self.faults.draw(index)
        if fault is FaultKind.TIMEOUT:
            # A hung request is not being served: it does not count as in flight.
            log.info("sim injecting fault", fault=str(fault), method=method, index=index)
            await _hold(TIMEOUT_HOLD_SECONDS, client_left)
            return Response(status_code=504)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.method_in_flight[method] += 1
        self.method_max_in_flight[method] = max(
            self.method_max_in_flight[method], self.method_in_flight[method]
        )
        try:
            if latency_ms:
                await asyncio.sleep(latency_ms / 1000)
            if fault is not None:
                log.info("sim injecting fault", fault=str(fault), method=method, index=index)
                return self._fault_response(fault, index, request_id)
            return self._rpc_response(method, params, request_id, index, history_host=history_host)
        finally:
            self.in_flight -= 1
            self.method_in_flight[method] -= 1

    async def answer_post(
        self, raw: bytes, client_left: Callable[[], Awaitable[bool]] | None = None
    ) -> Response:
        """A JSON-RPC POST: one request object with named parameters (no batches)."""
        us_in = time.time_ns() // 1000
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._envelope(
                {"error": {"code": -32700, "message": "Parse error"}}, us_in, None, status=400
            )
        if not isinstance(payload, dict) or not isinstance(payload.get("method"), str):
            error = {"code": -32600, "message": "Invalid Request"}
            return self._envelope({"error": error}, us_in, None, status=400)
        params = payload.get("params", {})
        if not isinstance(params, dict):
            error = {"code": -32602, "message": "Invalid params"}
            return self._envelope({"error": error}, us_in, payload.get("id"), status=400)
        return await self.answer(payload["method"], params, payload.get("id"), client_left)

    def _rpc_response(
        self,
        method: str,
        params: Mapping[str, Any],
        request_id: object,
        index: str | None = None,
        *,
        history_host: bool = False,
    ) -> Response:
        us_in = self._clock_us(index)
        handler = (self._history_methods if history_host else self._methods).get(method)
        try:
            if handler is None:
                raise JsonRpcError(-32601, "Method not found")
            try:
                result = handler(params)
            except JsonRpcParamsError as bad:
                raise JsonRpcError(
                    -32602, "Invalid params", data={"param": bad.param, "reason": bad.reason}
                ) from None
            response = self._envelope({"result": result}, us_in, request_id, index=index)
            if method == "public/get_index_price":
                self.record.add(
                    "index_price",
                    str(params["index_name"]),
                    result["index_price"],
                    us_in=us_in,
                    us_out=self._sent_us_out,
                )
            return response
        except JsonRpcError as failure:
            error: dict[str, Any] = {"code": failure.code, "message": failure.message}
            if failure.data is not None:
                error["data"] = dict(failure.data)
            return self._envelope({"error": error}, us_in, request_id, status=failure.status, index=index)

    def clock_ms(self, index: str | None) -> int:
        return self._clock_us(index) // 1000

    def _clock_us(self, index: str | None) -> int:
        """Deribit's clock for `index`, with the clock faults applied."""
        faults = self.faults.for_index(index)
        now = time.time_ns() // 1000 + round(faults.clock_offset_seconds * 1_000_000)
        if not faults.clock_frozen:
            self._frozen_us.pop(index, None)
            return now
        return self._frozen_us.setdefault(index, now)

    def _envelope(
        self,
        fields: dict[str, Any],
        us_in: int,
        request_id: object,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        index: str | None = None,
    ) -> Response:
        us_out = self._clock_us(index)
        self._sent_us_out = us_out
        body: dict[str, Any] = {"jsonrpc": "2.0", **fields}
        if request_id is not None:
            body["id"] = request_id
        body.update(usIn=us_in, usOut=us_out, usDiff=us_out - us_in, testnet=False)
        literal = self.faults.for_index(index).us_out_literal
        if literal is not None:
            body["usOut"] = orjson.Fragment(literal.encode())
            self._sent_us_out = literal
        content = exact_json.dumps(body)
        return Response(content, status_code=status, media_type="application/json", headers=headers)

    def _fault_response(self, fault: FaultKind, index: str | None, request_id: object) -> Response:
        us_in = time.time_ns() // 1000
        match fault:
            case FaultKind.ERROR:
                return Response(
                    "<html><body><h1>503 Service Unavailable</h1></body></html>", 503, media_type="text/html"
                )
            case FaultKind.DROP:
                return _DroppedResponse()
            case FaultKind.MALFORMED:
                return Response(b'{"jsonrpc":"2.0","result":{"index_price":43', media_type="application/json")
            case FaultKind.BAD_RESULT:
                result = {"index_price": "not-a-number", "estimated_delivery_price": None}
                return self._envelope({"result": result}, us_in, request_id)
            case _:  # FaultKind.RATE_LIMIT; TIMEOUT never gets here
                retry_after = self.faults.for_index(index).retry_after_seconds
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
                error = {"code": 10028, "message": "too_many_requests"}
                return self._envelope({"error": error}, us_in, request_id, status=429, headers=headers)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "ws_connections": [record.as_dict() for record in self.ws_connections],
            "methods": {
                method: {"requests": count, "max_in_flight": self.method_max_in_flight[method]}
                for method, count in self.method_requests.items()
            },
            "connections_open": self.connections.open,
            "max_connections_open": self.connections.max_open,
            "refused_connections": self.connections.refused,
        }

    def reset_faults(self) -> None:
        self.faults.reset()
        self._frozen_us.clear()

    def reset_stats(self) -> None:
        self.requests.clear()
        self.max_in_flight = self.in_flight
        self.ws_connections.clear()
        self.method_requests.clear()
        self.method_max_in_flight = self.method_in_flight.copy()
        self.connections.reset()
