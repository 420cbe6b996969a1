"""The API's HTTP server under pressure and at its death: no orphans, bounded idle
connections, caps on streams and exports."""

import asyncio
import os
import signal
import socket
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from crypto_client.api.app import create_app
from crypto_client.db import migrations
from tests.support import local_http
from tests.support.services import ApiServer, SimServer, crypto_client, free_port
from tests.support.settings import make_settings
from tests.support.waiting import wait_until, wait_until_async


def _group_alive(group: int) -> list[int]:
    """The processes of `group` not yet ended (a zombie has ended)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group_id = fields[0], int(fields[2])
        if group_id == group and state not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def sqlite_env(tmp_path: Path, sim: SimServer) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrations.upgrade(url)
    return {"DATABASE_URL": url, "DERIBIT_RPC_URL": sim.rpc_url, "DERIBIT_WS_URL": sim.ws_url}


@pytest.mark.parametrize(("command", "options"), [("serve", ()), ("api", ("--workers", "2"))])
def test_kill_9_of_the_server_ends_its_workers_and_frees_the_port(
    tmp_path: Path, sqlite_env: dict[str, str], command: str, options: tuple[str, ...]
) -> None:
    port = free_port()
    args = crypto_client(command, "--port", str(port), *options)
    server = ApiServer(args, sqlite_env, tmp_path / f"{command}.log", port=port, ready_path="/livez")
    main = server.process.popen.pid
    workers = 2 if command == "api" else 0  # one worker runs in the server's own process
    try:
        wait_until(lambda: len(_group_alive(main)) == 1 + workers, 30, what="the server's workers")
        os.kill(main, signal.SIGKILL)
        server.process.popen.wait(10)
        wait_until(lambda: not _group_alive(main), 10, what="the orphaned workers to end")
        wait_until(lambda: _port_free(server.port), 10, what="the port to be free")
    finally:
        server.stop()


def _livez_seconds(url: str) -> float:
    """One `/livez` on a fresh connection, as a new client would see it."""
    started = time.perf_counter()
    with local_http.client(timeout=10) as client:
        assert client.get(url + "/livez").status_code == 200
    return time.perf_counter() - started


async def test_idle_connections_and_full_stream_cap_leave_the_api_responsive(
    tmp_path: Path, sqlite_env: dict[str, str]
) -> None:
    env = {**sqlite_env, "API_MAX_STREAMS": "3", "API_KEEPALIVE_TIMEOUT_SECONDS": "2"}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as server:
        # 2,000 connections that never send a byte: a soft limit of 1,024 open files, or
        # granian's default admission of 1,024 per worker, left no room for anyone else.
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2000)]
        try:
            async with (
                local_http.async_client(base_url=server.url, timeout=10) as client,
                AsyncExitStack() as streams,
            ):
                for _ in range(3):
                    response = await streams.enter_async_context(client.stream("GET", "/prices/stream"))
                    assert response.status_code == 200
                refused = await client.get("/prices/stream")
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "5"
                assert "API_MAX_STREAMS" in refused.json()["detail"]
                latency = await asyncio.to_thread(_livez_seconds, server.url)
                # The real figure is measured in bench (server_limits); this only says "answers".
                print(
                    f"/livez with 2,000 idle connections and the stream cap reached: {latency * 1000:.1f} ms"
                )
                assert latency < 2.0
            # The streams are closed: their slots are free again.
            async with local_http.async_client(base_url=server.url, timeout=10) as client:

                async def stream_admitted() -> bool:
                    async with client.stream("GET", "/prices/stream") as response:
                        return response.status_code == 200

                await wait_until_async(stream_admitted, 10, what="a free stream slot")
        finally:
            for connection in idle:
                connection.close()


def test_idle_keep_alive_connections_are_closed(tmp_path: Path, sqlite_env: dict[str, str]) -> None:
    env = {**sqlite_env, "API_KEEPALIVE_TIMEOUT_SECONDS": "1"}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as server:
        kept = []
        for _ in range(20):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(b"GET /livez HTTP/1.1\r\nHost: api\r\n\r\n")
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            kept.append(connection)
        # Slow request headers are cut off by the same timeout.
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /livez HTTP/1.1\r\n")
        kept.append(slow)
        for connection in kept:
            connection.settimeout(10)
        try:
            wait_until(lambda: all(_closed_by_server(c) for c in kept), 10, what="idle connections closed")
        finally:
            for connection in kept:
                connection.close()


def _closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(4096) == b""
    except ConnectionResetError:
        return True


async def test_a_full_export_cap_answers_503_with_retry_after(sqlite_url: str) -> None:
    app = create_app(make_settings(sqlite_url, api_max_exports=1))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        params = {"ticker": "btc_usd", "from_ts": "0"}
        async with app.state.export_cap.slot():  # an export in progress
            refused = await client.get("/prices/export", params=params)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
            assert "API_MAX_EXPORTS" in refused.json()["detail"]
        assert (await client.get("/prices/export", params=params)).status_code == 200
        assert app.state.export_cap.held == 0
