import pytest
from pydantic import SecretStr, ValidationError

from crypto_client.config import DEFAULT_SQLITE_URL, Settings, SettingsError, load_settings
from crypto_client.domain import parse_ticker
from tests.support import launcher
from tests.support.services import crypto_client
from tests.support.settings import make_settings


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_tickers_are_split_normalized_and_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKERS", " BTC_USD, eth_usd,drbfix-btc_usdc,btc_usd,")
    assert load_settings().tickers == ("btc_usd", "eth_usd", "drbfix-btc_usdc")


@pytest.mark.parametrize("bad", ["btc usd", "-btc", "btc/usd", "é", "a" * 65, "btc\x00usd"])
def test_bad_ticker_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="not an index name"):
        parse_ticker(bad)


def test_database_url_precedence() -> None:
    assert settings().database_url_value == DEFAULT_SQLITE_URL
    parts = settings(postgres_host="db", postgres_password=SecretStr("p@ss word"), postgres_user="app")
    assert parts.database_url_value == "postgresql://app:p%40ss%20word@db:5432/crypto"
    explicit = settings(database_url=SecretStr("postgresql://x@h/d"), postgres_host="db")
    assert explicit.database_url_value == "postgresql://x@h/d"


def test_secrets_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2-secret@db/crypto")
    loaded = load_settings()
    assert "hunter2-secret" not in repr(loaded)
    assert "hunter2-secret" not in str(loaded.model_dump())


def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_TIMEOUT_SECONDS", "-1")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "HTTP_TIMEOUT_SECONDS" in str(error.value)
    assert "LOG_FORMAT" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TICKERS", "btc usd"),
        ("HTTP_TIMEOUT_SECONDS", "-1"),
        ("INGEST_INTERVAL_SECONDS", "soon"),
        ("INGEST_INTERVAL_SECONDS", "7"),
        ("DATABASE_URL", "garbage"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("DATABASE_URL", "postgresql://u@h:notaport/d"),
    ],
)
def test_cli_exits_with_one_readable_line(variable: str, value: str) -> None:
    result = launcher.run(
        crypto_client("migrate"),
        env={variable: value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("interval", [7, 11, 3601, 86399])
def test_an_interval_that_does_not_divide_a_day_is_refused(interval: int) -> None:
    with pytest.raises(ValidationError, match="must divide a day"):
        make_settings("sqlite:///x.db", ingest_interval_seconds=interval)


@pytest.mark.parametrize("interval", [1, 5, 6, 60, 300, 3600, 86400])
def test_intervals_that_divide_a_day_are_accepted(interval: int) -> None:
    settings = make_settings("sqlite:///x.db", ingest_interval_seconds=interval)
    assert settings.ingest_interval_seconds == interval
