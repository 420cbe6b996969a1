"""The simulator's HTTP app: Deribit's `/api/v2` in both request forms, its history host, the
WebSocket stream, plus `/_sim/` admin."""

from decimal import Decimal

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from crypto_client import __version__
from crypto_client.origin import SIMULATOR_HEADER
from crypto_client.sim.simulator import Simulator
from crypto_client.sim.stream import serve_stream


class _IdentifiesItself:
    """Marks every answer, the WebSocket handshake included, as the simulator's: the service
    records the origin of its data from this header, never from the URL it was given."""

    _HEADER = (SIMULATOR_HEADER.lower().encode(), __version__.encode())

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), self._HEADER]}
            await send(message)

        await self._app(scope, receive, marked)


def create_sim_app(simulator: Simulator | None = None) -> Starlette:
    sim = simulator or Simulator()

    async def rpc_get(request: Request) -> Response:
        method = "public/" + request.path_params["method"]
        return await sim.answer(method, dict(request.query_params), client_left=request.is_disconnected)

    async def history_get(request: Request) -> Response:
        method = "public/" + request.path_params["method"]
        return await sim.answer(
            method, dict(request.query_params), client_left=request.is_disconnected, history_host=True
        )

    async def rpc_post(request: Request) -> Response:
        return await sim.answer_post(await request.body(), request.is_disconnected)

    async def admin_faults(request: Request) -> Response:
        if request.method == "DELETE":
            sim.reset_faults()
        elif request.method in ("PUT", "POST"):
            try:
                changes = orjson.loads(await request.body())
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                index = changes.pop("index", None)
                sim.faults.set(index, changes)
            except (ValueError, TypeError) as exc:
                return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse(sim.faults.as_dict())

    async def admin_prices(request: Request) -> Response:
        """Pin indexes to exact prices (a JSON object of name to decimal string); DELETE
        unpins them all."""
        if request.method == "DELETE":
            sim.walk.pinned.clear()
            return JSONResponse({})
        try:
            pins = orjson.loads(await request.body())
            if not isinstance(pins, dict):
                raise ValueError("expected a JSON object of index name to price")
            for name, price in pins.items():
                Decimal(str(price))  # must be a number; it is served as this very text
                sim.walk.pinned[str(name)] = str(price)
        except (ValueError, ArithmeticError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse(sim.walk.pinned)

    async def admin_stats(request: Request) -> Response:
        if request.method == "DELETE":
            sim.reset_stats()
        return JSONResponse(sim.stats())

    async def admin_served(request: Request) -> Response:
        """What the simulator served, oldest first, from record `after` on (a page at most)."""
        try:
            after = int(request.query_params.get("after", "0"))
            limit = int(request.query_params.get("limit", "10000"))
            if after < 0 or not 1 <= limit <= 100_000:
                raise ValueError("after must be >= 0 and limit 1 to 100000")
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return Response(orjson.dumps(sim.record.after(after, limit)), media_type="application/json")

    async def stream(websocket: WebSocket) -> None:
        await serve_stream(
            websocket,
            faults=lambda: sim.faults.default,
            price_of=sim.serve_price,
            clock_ms=sim.clock_ms,
            known=lambda name: name in sim.walk,
            connections=sim.ws_connections,
            served=sim.record,
        )

    routes = [
        WebSocketRoute("/ws/api/v2", stream),
        Route("/api/v2", rpc_post, methods=["POST"]),
        Route("/api/v2/public/{method:str}", rpc_get, methods=["GET"]),
        # Deribit's history host, https://history.deribit.com/api/v2, on a base path of its own.
        Route("/history/api/v2/public/{method:str}", history_get, methods=["GET"]),
        Route("/_sim/faults", admin_faults, methods=["GET", "PUT", "POST", "DELETE"]),
        Route("/_sim/prices", admin_prices, methods=["PUT", "DELETE"]),
        Route("/_sim/stats", admin_stats, methods=["GET", "DELETE"]),
        Route("/_sim/served", admin_served, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_IdentifiesItself)])
    app.state.simulator = sim
    return app
