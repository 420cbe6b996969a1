"""Processes as an operator meets them: what each does at start when a dependency is missing
or misconfigured, and how it recovers."""

import asyncio
from pathlib import Path

import pytest

from crypto_client.config import SettingsError, load_settings
from tests.support import launcher
from tests.support.api import api_client
from tests.support.commands import assert_one_clear_line, run
from tests.support.databases import create_pg_database
from tests.support.services import (
    ApiServer,
    Process,
    ThrowawayPostgres,
    ThrowawayRedis,
    crypto_client,
    free_port,
)
from tests.support.settings import make_settings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def closed_port_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


async def test_the_api_starts_without_its_database_and_recovers_by_itself(
    throwaway_pg: ThrowawayPostgres, tmp_path: Path
) -> None:
    url = await create_pg_database(throwaway_pg.url)
    throwaway_pg.stop()
    env = {"DATABASE_URL": url, "TICKERS": "btc_usd"}
    with ApiServer.command("api", env, tmp_path, ready_path="/livez") as api:
        warning = [line for line in api.process.output.splitlines() if "starting anyway" in line]
        assert len(warning) == 1, api.process.output
        assert "DATABASE_URL" in warning[0]
        health = api.get("/health")
        assert health.status_code == 503
        for path in ("/prices", "/prices/latest", "/tickers"):
            answer = api.get(path, ticker="btc_usd")
            assert answer.status_code == 503, (path, answer.text)
            assert "database is unavailable" in answer.json()["detail"]
        throwaway_pg.start()
        wait_until(lambda: api.get("/health").status_code == 200, 20, what="/health after the database")
        assert api.get("/prices", ticker="btc_usd").json() == []
    assert "Traceback" not in api.process.output


CANNOT_HEAL = {
    "scheme": ({"DATABASE_URL": "mysql://x@y/z"}, ("DATABASE_URL", "unsupported database 'mysql'")),
    "sqlite-without-path": ({"DATABASE_URL": "sqlite://"}, ("DATABASE_URL", "needs a file path")),
    "unparsable": ({"DATABASE_URL": "://nonsense"}, ("DATABASE_URL", "not a database URL")),
    "read-url-not-postgres": (
        {"DATABASE_READ_URL": "sqlite:///replica.db"},
        ("DATABASE_READ_URL", "must be a PostgreSQL URL"),
    ),
    "broker-scheme": (
        {"CELERY_BROKER_URL": "http://redis:6379"},
        ("CELERY_BROKER_URL", "must be a Redis URL"),
    ),
    "log-level": ({"LOG_LEVEL": "chatty"}, ("LOG_LEVEL",)),
}


@pytest.mark.parametrize("problem", CANNOT_HEAL)
def test_what_cannot_heal_is_named_by_the_settings(problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env, expected = CANNOT_HEAL[problem]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    for text in expected:
        assert text in str(error.value)


# Every command reads its settings through the same check (`checked_settings`): each one runs
# in a real process with one of the problems, and every problem meets one command.
@pytest.mark.parametrize(
    ("command", "problem"),
    list(zip(["api", "worker", "beat", "stream", "ingest", "backfill"], CANNOT_HEAL, strict=True)),
)
def test_what_cannot_heal_stops_every_command_in_one_line(command: str, problem: str, tmp_path: Path) -> None:
    env, expected = CANNOT_HEAL[problem]
    args = [command, "--port", str(free_port())] if command == "api" else [command]
    result = run(*args, cwd=tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert_one_clear_line(result, "invalid configuration", *expected)


@pytest.mark.parametrize("command", ["ingest", "backfill"])
def test_one_shot_commands_name_an_unreachable_database_and_its_setting(command: str, tmp_path: Path) -> None:
    result = run(command, cwd=tmp_path, DATABASE_URL=closed_port_url())
    assert result.returncode == 1
    assert_one_clear_line(result, "DATABASE_URL", "nothing accepts connections")
    assert "Errno" not in result.stderr


async def test_a_database_that_is_not_migrated_is_named_with_what_to_do(tmp_path: Path) -> None:
    url = await create_pg_database(migrate=False)
    result = run("ingest", cwd=tmp_path, DATABASE_URL=url)
    assert_one_clear_line(result, "DATABASE_URL", "not migrated yet", "crypto-client migrate")
    await asyncio.to_thread(
        launcher.run, crypto_client("migrate", "0005"), env={"DATABASE_URL": url}, check=True
    )
    result = run("ingest", cwd=tmp_path, DATABASE_URL=url)
    assert_one_clear_line(result, "DATABASE_URL", "revision 0005", "crypto-client migrate")


def test_log_level_and_format_accept_any_case(tmp_path: Path) -> None:
    result = run("ingest", cwd=tmp_path, DATABASE_URL=closed_port_url(), LOG_LEVEL="debug", LOG_FORMAT="JSON")
    assert result.returncode == 1  # the database, not the settings
    assert "invalid configuration" not in result.stderr


async def test_a_worker_waits_for_its_database_saying_so_then_starts(
    throwaway_pg: ThrowawayPostgres, redis_server: ThrowawayRedis, tmp_path: Path
) -> None:
    url = await create_pg_database(throwaway_pg.url)
    throwaway_pg.stop()
    env = {"DATABASE_URL": url, "CELERY_BROKER_URL": redis_server.url, "LOG_FORMAT": "json"}
    worker = Process(crypto_client("worker", "--concurrency", "1"), env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: worker.output.count("waiting: cannot use the database") >= 2, 30, what="two waiting lines"
        )
        assert "DATABASE_URL" in worker.output
        assert "ready" not in worker.output
        throwaway_pg.start()
        wait_until(lambda: "ready" in worker.output, 60, what="the worker ready once the database is up")
        assert worker.popen.poll() is None
    finally:
        worker.stop()
    assert "Traceback" not in worker.output


def test_beat_gives_up_on_an_unreachable_broker_after_the_bound(tmp_path: Path) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    result = run("beat", cwd=tmp_path, CELERY_BROKER_URL=broker, STARTUP_WAIT_SECONDS="6")
    assert result.returncode == 1
    waiting = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "waiting:" in line]
    assert waiting
    assert all("CELERY_BROKER_URL" in line for line in waiting)
    assert "Traceback" not in result.stderr + result.stdout
    assert "gave up after STARTUP_WAIT_SECONDS=6" in result.stderr


def test_the_coinbase_host_is_accepted(tmp_path: Path) -> None:
    result = run(
        "ingest",
        cwd=tmp_path,
        DATABASE_URL=closed_port_url(),
        DERIBIT_RPC_URL="https://drb.coinbase.com/api/v2",
        DERIBIT_WS_URL="wss://drb.coinbase.com/ws/api/v2",
    )
    assert "invalid configuration" not in result.stderr
    assert "DATABASE_URL" in result.stderr


async def test_every_answer_says_nosniff_and_the_dashboard_allows_only_its_own_assets(
    sqlite_url: str,
) -> None:
    async with api_client(make_settings(sqlite_url)) as api:
        for path in (
            "/health",
            "/prices?ticker=nope",
            "/prices?limit=0",
            "/static/dashboard/dashboard.js",
            "/nope",
        ):
            assert (await api.get(path)).headers["x-content-type-options"] == "nosniff", path
        dashboard = await api.get("/")
        policy = {
            directive.split()[0]: directive.split()[1:]
            for directive in dashboard.headers["content-security-policy"].split("; ")
        }
        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"] == ["'self'"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert "'unsafe-inline'" not in policy["style-src"]
        assert dashboard.headers["x-content-type-options"] == "nosniff"


def test_an_offline_serve_says_once_that_deribit_is_unreachable_and_how_to_demo(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'offline.db'}",
        "DERIBIT_RPC_URL": f"http://127.0.0.1:{free_port()}/api/v2",  # nothing listens there
        "DERIBIT_MAX_RETRIES": "0",
        "INGEST_INTERVAL_SECONDS": "1",
        "BACKFILL_INTERVAL_SECONDS": "0",
    }
    with ApiServer.command("serve", env, tmp_path, ready_path="/livez") as serve:
        notice = "Deribit is unreachable"
        wait_until(lambda: notice in serve.process.output, 30, what="the offline notice")
        said_at = serve.process.output.count("tick finished")
        wait_until(
            lambda: serve.process.output.count("tick finished") >= said_at + 3, 30, what="3 more ticks"
        )
        assert serve.process.output.count(notice) == 1
        line = next(line for line in serve.process.output.splitlines() if notice in line)
        assert "crypto-client serve --simulate" in line
        assert "DERIBIT_RPC_URL" in line
