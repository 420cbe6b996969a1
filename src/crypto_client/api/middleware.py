"""ASGI middleware: one log line per request (with a request id echoed back), HEAD on every
GET route, and cancelling the work of a client that left."""

import asyncio
import re
import time
import uuid

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crypto_client import metrics
from crypto_client.api.client_address import client_address

log = structlog.get_logger("crypto_client.api.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class HttpMiddleware:
    """Plain ASGI (no BaseHTTPMiddleware, which adds a task and a copy per request) that acts
    on HTTP requests only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"})


class RequestLogMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex
        status: int | None = None
        failed = True

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                # Browsers must not guess a type: a JSON error echoing input is never HTML.
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
                failed = False
            finally:
                duration = time.perf_counter() - started
                # 499: the client left before an answer (nginx's code for it).
                final_status = status or (500 if failed else 499)
                access = getattr(scope["app"].state, "access", None)
                log.info(
                    "request",
                    method=scope["method"],
                    client=client_address(scope, access.trusted_proxies if access else ()),
                    path=scope["path"],
                    status=final_status,
                    duration_ms=round(duration * 1000, 2),
                )
                route = scope.get("route")
                metrics.HTTP_REQUEST_DURATION.labels(
                    scope["method"] if scope["method"] in _KNOWN_METHODS else "other",
                    getattr(route, "path", "unmatched"),  # the template, never the raw path
                    str(final_status),
                ).observe(duration)


class HeadAsGet(HttpMiddleware):
    """Answers `HEAD` on every `GET` route: the request runs as `GET` and the body is dropped
    (monitors and load balancers send HEAD)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class CancelOnDisconnect(HttpMiddleware):
    """Cancels a request's work (its database query included) as soon as its client leaves,
    so abandoned requests do not keep connections and queries busy for the ones still here.

    The app sees the request's messages through a queue; the real `receive` is watched for
    `http.disconnect` meanwhile."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages: asyncio.Queue[Message] = asyncio.Queue()
        handler = asyncio.current_task()
        assert handler is not None
        responding = False

        async def watch() -> None:
            while True:
                message = await receive()
                await messages.put(message)
                if message["type"] == "http.disconnect":
                    if not responding:
                        handler.cancel()
                    return

        async def send_marking(message: Message) -> None:
            nonlocal responding
            responding = True  # a response under way finishes; only waiting is cancelled
            await send(message)

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, messages.get, send_marking)
        except asyncio.CancelledError:
            if not watcher.done() or responding:
                raise
            handler.uncancel()
            log.info("client left, request cancelled", method=scope["method"], path=scope["path"])
        finally:
            watcher.cancel()
