"""The first ten minutes of a new user: one clear line for every start-up failure, an offline
demo in one command, offline API docs, and the small things around them."""

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import psutil
import pytest
from structlog.testing import capture_logs

from crypto_client import __version__
from crypto_client.clients.deribit.http import DeribitHttpClient
from tests.support import local_http
from tests.support.api import api_client
from tests.support.commands import assert_one_clear_line, run
from tests.support.services import ApiServer, Process, SimServer, crypto_client, free_port
from tests.support.settings import make_settings
from tests.support.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.slow


def test_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"crypto-client {__version__}")


# Every command checks its database through the same start-up check (crypto_client.startup):
# each failure runs in one command's real process, and every command meets one failure.
@pytest.mark.parametrize(
    ("command", "url", "expected"),
    [
        ("migrate", "mysql://x@y/z", "unsupported database 'mysql'"),
        ("serve", "postgresql://postgres@no-such-host.invalid/db", "unknown host 'no-such-host.invalid'"),
        ("ingest", "postgresql://postgres@127.0.0.1:{closed}/postgres", "nothing accepts connections"),
        (
            "backfill",
            "postgresql://postgres@127.0.0.1:5432/cc_no_such_database",
            "'cc_no_such_database' does not exist",
        ),
        ("serve", "postgresql://cc_no_such_role@127.0.0.1:5432/postgres", "refused user 'cc_no_such_role'"),
    ],
    ids=[
        "scheme-migrate",
        "unknown-host-serve",
        "refused-port-ingest",
        "missing-database-backfill",
        "unknown-role-serve",
    ],
)
def test_every_database_failure_at_start_is_one_line(
    command: str, url: str, expected: str, tmp_path: Path
) -> None:
    args = [command, "--port", str(free_port())] if command == "serve" else [command]
    result = run(*args, cwd=tmp_path, DATABASE_URL=url.format(closed=free_port()))
    assert_one_clear_line(result, expected, "DATABASE_URL")


def test_the_docker_env_file_is_named_when_used_for_a_local_run(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POSTGRES_HOST=db\nPOSTGRES_PASSWORD=change-me\n")
    result = run("serve", "--port", str(free_port()), cwd=tmp_path)
    message = assert_one_clear_line(result, "POSTGRES_HOST (in .env)", "unknown host 'db'")
    assert "change-me" not in message


def test_a_taken_port_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), cwd=tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    assert_one_clear_line(result, f"port {port}", "--port")
    assert not (tmp_path / "x.db").exists()  # it stopped before migrating or fetching


def test_a_mistyped_celery_option_is_one_line() -> None:
    result = run("worker", "--concurency", "2")
    assert_one_clear_line(result, "--concurency")
    help_text = run("worker", "--help").stdout
    assert "crypto-client worker -- --help" in help_text.replace("\n", " ").replace("  ", " ")


def test_help_fits_eighty_columns() -> None:
    for command in ([], ["sim"], ["serve"], ["backfill"]):
        text = run(*command, "--help").stdout
        assert text.strip()
        assert max(len(line) for line in text.splitlines()) <= 80, text


def test_serve_simulate_shows_prices_offline_within_seconds(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/demo.db",
        "INGEST_INTERVAL_SECONDS": "2",
        "LOG_FORMAT": "json",
    }
    sim_port = free_port()
    args = crypto_client("serve", "--simulate", "--port", str(port), "--sim-port", str(sim_port))
    with ApiServer(args, env, tmp_path / "demo.log", port=port, ready_path="/health") as server:

        def latest() -> dict[str, Any] | None:
            response = server.get("/prices/latest", ticker="btc_usd")
            found: dict[str, Any] | None = response.json() if response.status_code == 200 else None
            return found

        body = wait_until(latest, 15, what="a simulated price")
        assert body is not None
        assert body["ticker"] == "btc_usd"
        started = next(line for line in server.output.splitlines() if "crypto-client serve starting" in line)
        for field in ('"version"', '"database"', '"deribit"', '"tickers"', '"interval_seconds"'):
            assert field in started
        assert "setup plugin" not in server.output
        assert "made up" in server.output
        assert f'"simulator": "http://127.0.0.1:{sim_port}"' in server.output
        faults = local_http.put(f"http://127.0.0.1:{sim_port}/_sim/faults", json={"latency_ms": 1}, timeout=5)
        assert faults.status_code == 200


async def test_api_docs_are_served_without_a_network(db_url: str) -> None:
    async with api_client(make_settings(db_url)) as api:
        page = (await api.get("/docs")).text
        assets = [part.split('"')[1] for part in page.split("=")[1:] if part.startswith('"/static/')]
        assert len(assets) >= 2
        assert "http://" not in page.replace("http://api", "")
        assert "https://" not in page
        for asset in assets:
            response = await api.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 100
    static = Path(__file__).resolve().parents[2] / "src/crypto_client/api/static/swagger-ui"
    assert "Apache License" in (static / "LICENSE").read_text()


async def test_the_readme_paging_snippet_walks_every_page(engine: Any, db_url: str) -> None:
    from decimal import Decimal

    from crypto_client.db.writer import PriceWriter
    from crypto_client.domain import NewPrice

    async with engine.begin() as connection:
        await PriceWriter(connection).insert_many([NewPrice("btc_usd", Decimal("1"), ts) for ts in range(25)])
    async with api_client(make_settings(db_url)) as api:
        # The README's snippet, with the in-process client for httpx.get:
        url: str | None = "http://api/prices?ticker=btc_usd&limit=10"
        rows = []
        while url:
            response = await api.get(url)
            rows += response.json()
            next_page = response.links.get("next")
            url = urljoin(url, next_page["url"]) if next_page else None
    assert [row["ts"] for row in rows] == list(range(25))


async def test_an_unknown_ticker_is_a_404_and_a_configured_one_without_rows_is_empty(db_url: str) -> None:
    async with api_client(make_settings(db_url, tickers="btc_usd")) as api:
        for path in ("/prices", "/prices/range"):
            unknown = await api.get(path, params={"ticker": "btc_usdd"})
            assert unknown.status_code == 404
            assert "btc_usdd" in unknown.json()["detail"]
            assert "/tickers" in unknown.json()["detail"]
            configured = await api.get(path, params={"ticker": "btc_usd"})
            assert (configured.status_code, configured.json()) == (200, [])


def test_ctrl_c_is_immediate_while_a_tick_is_only_fetching(sim: SimServer, tmp_path: Path) -> None:
    sim.faults(latency_ms=20_000)  # every tick hangs in its fetch
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/c.db", "DERIBIT_RPC_URL": sim.rpc_url, "LOG_FORMAT": "json"}
    server = ApiServer.command("serve", env, tmp_path, ready_path="/health")
    try:
        wait_until(lambda: '"tick started"' in server.output, 10, what="a tick to start")
        server.process.signal_group(signal.SIGINT)
        stopped = time.monotonic()
        server.process.popen.wait(10)
        assert time.monotonic() - stopped < 2
    finally:
        server.stop()
    assert '"embedded scheduler stopped"' in server.output


def test_the_simulator_stops_on_the_first_ctrl_c_despite_hung_requests(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        crypto_client("sim", "--port", str(port), "--timeout-rate", "1"), {}, tmp_path / "s.log"
    )
    try:
        wait_until(
            lambda: local_http.get(f"http://127.0.0.1:{port}/_sim/stats").status_code == 200, 20, what="sim"
        )
        with pytest.raises(httpx.TimeoutException):
            local_http.get(
                f"http://127.0.0.1:{port}/api/v2/public/get_index_price?index_name=btc_usd", timeout=1
            )
        process.popen.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        process.popen.wait(10)
        assert time.monotonic() - stopped < 3
    finally:
        process.stop()


def test_simulator_faults_prices_and_stats_reset_separately(sim: SimServer) -> None:
    sim.pin(btc_usd="1.25")
    sim.faults("eth_usd", outage=True)
    local_http.delete(f"{sim.url}/_sim/faults").raise_for_status()
    assert (
        local_http.get(f"{sim.rpc_url}/public/get_index_price", params={"index_name": "eth_usd"}).status_code
        == 200
    )
    price = local_http.get(f"{sim.rpc_url}/public/get_index_price", params={"index_name": "btc_usd"}).text
    assert '"index_price":1.25' in price  # the pin survived the fault reset
    assert sim.stats()["requests"]
    local_http.delete(f"{sim.url}/_sim/prices").raise_for_status()
    local_http.delete(f"{sim.url}/_sim/stats").raise_for_status()
    assert sim.stats()["requests"] == {}
    price = local_http.get(f"{sim.rpc_url}/public/get_index_price", params={"index_name": "btc_usd"}).text
    assert '"index_price":1.25,' not in price


def server_closed_our_connection(sim: SimServer) -> bool:
    """A connection of this process to the simulator that the server closed (its FIN came)."""
    port = urlsplit(sim.rpc_url).port
    return any(
        connection.raddr and connection.raddr.port == port and connection.status == psutil.CONN_CLOSE_WAIT
        for connection in psutil.Process().net_connections("tcp")
    )


async def test_no_spurious_retry_on_a_connection_the_server_closed(sim: SimServer) -> None:
    async with DeribitHttpClient(sim.rpc_url, max_retries=2, backoff_seconds=0.01) as client:
        with capture_logs() as logs:
            await client.get_index_price("btc_usd")
            await wait_until_async(
                lambda: asyncio.sleep(0, server_closed_our_connection(sim)), 15, what="the keep-alive end"
            )
            await client.get_index_price("btc_usd")
    assert not [line for line in logs if "retrying" in line["event"]]
    assert sim.requests_for("btc_usd") == 2
