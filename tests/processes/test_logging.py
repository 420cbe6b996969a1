"""One logging set-up for every process: text or JSON lines, structured fields, no secrets."""

import json
import logging
import subprocess
import sys

import pytest
import structlog

from crypto_client.logging import setup_logging

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_json_lines_carry_structured_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    structlog.get_logger("crypto_client.test").info("tick finished", stored=3, ticker="btc_usd")
    logging.getLogger("celery.worker").warning("from the standard library")
    logging.getLogger("crypto_client.test").debug("below the level")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    assert lines[0]["event"] == "tick finished"
    assert lines[0]["stored"] == 3
    assert lines[0]["ticker"] == "btc_usd"
    assert lines[0]["level"] == "info"
    assert lines[0]["logger"] == "crypto_client.test"
    assert "timestamp" in lines[0]
    assert lines[1]["event"] == "from the standard library"
    assert lines[1]["level"] == "warning"


def test_text_format_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG", "text")
    structlog.get_logger("crypto_client.test").warning("deribit call failed", attempt=2, ticker="eth_usd")
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1
    assert "deribit call failed" in out[0]
    assert "attempt=2" in out[0]
    assert "ticker=eth_usd" in out[0]


def test_broker_password_never_reaches_the_worker_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery prints the broker URL at start; it must be the masked form."""
    env = {
        "CELERY_BROKER_URL": "redis://:sup3r-secret@127.0.0.1:1/0",
        "DATABASE_URL": "postgresql://app:db-secret@127.0.0.1:1/crypto",
        "PATH": "/usr/bin:/bin",
    }
    code = (
        "from crypto_client.worker.celery_app import celery_app, settings;"
        "print(celery_app.connection().as_uri()); print(repr(settings))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sup3r-secret" not in result.stdout + result.stderr
    assert "db-secret" not in result.stdout + result.stderr
