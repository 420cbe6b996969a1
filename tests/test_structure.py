"""The layout's contracts: what may import what, and the one definition of shared shapes."""

import ast
from pathlib import Path

import pytest

from crypto_client.api.schemas import PriceOut
from crypto_client.config import Settings, SettingsError, load_settings
from crypto_client.domain import PriceRow

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "crypto_client"


def imported_modules(directory: Path) -> set[str]:
    modules: set[str] = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
    return modules


def test_the_api_imports_nothing_from_ingestion() -> None:
    forbidden = (
        "crypto_client.ingestion",
        "crypto_client.worker",
        "crypto_client.clients",
        "crypto_client.serve",
    )
    leaks = {module for module in imported_modules(PACKAGE / "api") if module.startswith(forbidden)}
    assert leaks == set()


def test_ingestion_depends_on_the_price_source_protocol_not_a_client() -> None:
    tick_imports = imported_modules(PACKAGE / "ingestion") - {"crypto_client.ingestion.runtime"}
    # Only the runtime, which chooses the source, may name a concrete client.
    runtime = ast.parse((PACKAGE / "ingestion" / "runtime.py").read_text())
    others = {
        node.module
        for path in (PACKAGE / "ingestion").glob("*.py")
        if path.name != "runtime.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not any(module.startswith("crypto_client.clients.deribit") for module in others)
    assert any(
        isinstance(node, ast.ImportFrom) and node.module == "crypto_client.clients.deribit.http"
        for node in ast.walk(runtime)
    )
    assert "crypto_client.clients.source" in tick_imports


def test_price_objects_have_one_shape() -> None:
    assert tuple(PriceOut.model_fields) == PriceRow._fields


def test_deribit_settings_keep_their_old_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_MAX_RETRIES", "7")
    assert load_settings().deribit_max_retries == 7
    monkeypatch.setenv("DERIBIT_MAX_RETRIES", "2")
    assert load_settings().deribit_max_retries == 2  # the new name wins
    assert Settings.model_validate({"http_timeout_seconds": 3}).deribit_timeout_seconds == 3


def test_a_bad_value_in_the_env_file_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DERIBIT_MAX_RETRIES=many\n")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "DERIBIT_MAX_RETRIES (in .env)" in str(error.value)


def test_the_command_line_imports_prometheus_client_only_after_choosing_its_mode() -> None:
    """prometheus_client picks single- or multi-process mode when first imported: `crypto-client
    api` and `worker` set PROMETHEUS_MULTIPROC_DIR first, so merely loading the CLI must not
    import it."""
    import subprocess
    import sys

    probe = "import sys, crypto_client.cli; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
