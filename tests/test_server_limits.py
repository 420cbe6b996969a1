"""The API's HTTP server under pressure and at its death: no orphans, bounded idle
connections, caps on streams and exports."""

import os
import signal
import socket
from pathlib import Path

import pytest

from crypto_client.db import migrations
from tests.support.services import ApiServer, SimServer, crypto_client, free_port
from tests.support.waiting import wait_until


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
    workers = 2 if command == "api" else 1
    wait_until(lambda: len(_group_alive(main)) == 1 + workers, 30, what="the server's workers")
    try:
        os.kill(main, signal.SIGKILL)
        server.process.popen.wait(10)
        wait_until(lambda: not _group_alive(main), 10, what="the orphaned workers to end")
        wait_until(lambda: _port_free(server.port), 10, what="the port to be free")
    finally:
        server.stop()
