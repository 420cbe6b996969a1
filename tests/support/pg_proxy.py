"""A TCP proxy in front of PostgreSQL that injects faults a real network and server produce:
a connection lost just before or just after COMMIT, lost in the middle of a query, every
connection cut at once, and added latency.

It reads the client's messages by the wire protocol's framing (a type byte and an int32
length that counts itself; the startup phase has no type byte), so a COMMIT is recognised as
one Query or Parse message, never by looking for bytes that may span messages. On the server
side it reads the same framing to know when the server has answered the COMMIT.
"""

import asyncio
import struct
import threading
from collections.abc import Awaitable
from concurrent.futures import Future
from types import TracebackType
from typing import Literal, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")

CommitCut = Literal["before", "after"]

# Request codes of the untyped messages a client may send before its StartupMessage.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
# Statements that are not "a query" for `cut_mid_query`: transaction control and the
# empty statement asyncpg's pool uses as a ping.
_NOT_A_QUERY = {"", "BEGIN", "START TRANSACTION", "COMMIT", "END", "ROLLBACK"}


def _statement(kind: bytes, payload: bytes) -> str | None:
    """The SQL text of a Query ('Q') or Parse ('P') message, normalised; None for others."""
    if kind == b"Q":
        sql = payload.split(b"\0", 1)[0]
    elif kind == b"P":
        # Parse: statement name, NUL, query text, NUL, parameter types.
        parts = payload.split(b"\0", 2)
        if len(parts) < 2:
            return None
        sql = parts[1]
    else:
        return None
    return sql.decode("utf-8", "replace").strip().rstrip(";").strip().upper()


async def _read_typed(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes]:
    """One typed message: its type byte, its payload, and its raw bytes."""
    header = await reader.readexactly(5)
    (length,) = struct.unpack("!i", header[1:])
    payload = await reader.readexactly(length - 4)
    return header[:1], payload, header + payload


class _Link:
    """One client connection and its connection to the server."""

    def __init__(
        self,
        proxy: "PgProxy",
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.awaiting_commit_reply = False  # "after" mode: drop when the server answers COMMIT
        self.closed = False

    def drop(self) -> None:
        """Cut both connections at once, as a network failure would (no orderly goodbye)."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_writer, self.server_writer):
            writer.transport.abort()
        self.proxy._links.discard(self)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.proxy.latency_seconds > 0:
            await asyncio.sleep(self.proxy.latency_seconds)
        if self.closed:
            return
        writer.write(data)
        await writer.drain()

    async def run(self) -> None:
        try:
            if await self._startup():
                await asyncio.gather(self._client_to_server(), self._server_to_client())
            else:
                await asyncio.gather(
                    self._raw(self.client_reader, self.server_writer),
                    self._raw(self.server_reader, self.client_writer),
                )
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.drop()

    async def _startup(self) -> bool:
        """Relay the untyped startup phase; False when the rest cannot be parsed (TLS)."""
        while True:
            header = await self.client_reader.readexactly(4)
            (length,) = struct.unpack("!i", header)
            body = await self.client_reader.readexactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            await self._send(self.server_writer, header + body)
            if code == _CANCEL_REQUEST:
                return False
            if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                return True  # the StartupMessage: typed messages follow
            answer = await self.server_reader.readexactly(1)
            await self._send(self.client_writer, answer)
            if answer != b"N":
                return False  # encrypted from here on

    async def _client_to_server(self) -> None:
        while not self.closed:
            kind, payload, raw = await _read_typed(self.client_reader)
            statement = _statement(kind, payload)
            if statement is not None:
                if statement == "COMMIT" and self.proxy._take_commit_cut("before"):
                    self.drop()
                    return
                if statement == "COMMIT" and self.proxy._take_commit_cut("after"):
                    self.awaiting_commit_reply = True
                elif statement not in _NOT_A_QUERY and self.proxy._take_mid_query_cut():
                    await self._send(self.server_writer, raw)
                    self.drop()
                    return
            await self._send(self.server_writer, raw)

    async def _server_to_client(self) -> None:
        while not self.closed:
            kind, _payload, raw = await _read_typed(self.server_reader)
            if self.awaiting_commit_reply and kind in (b"C", b"E"):
                # CommandComplete (or an error) for the COMMIT: the server has decided; the
                # client never hears what.
                self.drop()
                return
            await self._send(self.client_writer, raw)

    async def _raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.closed:
            data = await reader.read(65536)
            if not data:
                return
            await self._send(writer, data)


class PgProxy:
    """A fault-injecting proxy on 127.0.0.1:`port` in front of `upstream_host:upstream_port`,
    running its own event loop in a thread, so it works beside any test or process.

    Each `cut_*` arms one fault for the next matching moment of any connection; `cuts` counts
    the faults done so far.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_seconds = 0.0
        self.cuts = 0
        self._lock = threading.Lock()
        self._commit_cuts: list[CommitCut] = []
        self._mid_query_cuts = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine: Awaitable[T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this proxy's."""
        parsed = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def cut_next_commit(self, mode: CommitCut) -> None:
        """At the next COMMIT a client sends, drop its connection: `before` forwarding it (the
        server rolls back), or `after` the server answered it (committed, but the client
        never learns it)."""
        with self._lock:
            self._commit_cuts.append(mode)

    def cut_mid_query(self) -> None:
        """Drop the next connection that sends a query (not BEGIN/COMMIT/ROLLBACK or the
        empty ping), right after forwarding it: the server runs it, its answer is lost."""
        with self._lock:
            self._mid_query_cuts += 1

    def cut_all(self) -> None:
        """Drop every connection open now (new ones are accepted again at once)."""

        async def drop_all() -> None:
            for link in list(self._links):
                link.drop()

        self._call(drop_all())

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk forwarded in either direction by `seconds`."""
        self.latency_seconds = seconds

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for link in list(self._links):
                link.drop()
            await self._server.wait_closed()

        if self._loop.is_running():
            self._call(shut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "PgProxy":
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def _take_commit_cut(self, mode: CommitCut) -> bool:
        with self._lock:
            if self._commit_cuts and self._commit_cuts[0] == mode:
                self._commit_cuts.pop(0)
                self.cuts += 1
                return True
            return False

    def _take_mid_query_cut(self) -> bool:
        with self._lock:
            if self._mid_query_cuts:
                self._mid_query_cuts -= 1
                self.cuts += 1
                return True
            return False

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        link = _Link(self, (client_reader, client_writer), server)
        self._links.add(link)
        await link.run()
