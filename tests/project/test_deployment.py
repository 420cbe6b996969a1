"""Static checks of the Docker files, since no Docker engine runs here."""

import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from crypto_client.cli import app
from crypto_client.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ("migrate", "api", "worker", "beat", "stream")


def env_example_variables() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    )
    return dict(pairs)


def settings_variables() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"^FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_every_service_exists_with_one_beat() -> None:
    assert set(SERVICES) == {
        "db",
        "redis",
        "migrate",
        "api",
        "worker",
        "beat",
        "stream",
        "prometheus",
        "grafana",
    }
    assert SERVICES["db"]["image"].startswith("postgres:16")
    assert SERVICES["redis"]["image"].startswith("redis:7")
    beats = [name for name, service in SERVICES.items() if "beat" in " ".join(service.get("command", []))]
    assert beats == ["beat"]
    assert SERVICES["beat"].get("deploy", {}).get("replicas", 1) == 1


def test_application_services_run_commands_that_exist() -> None:
    cli_commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in APP_SERVICES:
        command = SERVICES[name]["command"]
        if command[0] == "crypto-client":
            assert command[1] in cli_commands, name
        else:
            assert command[:3] == ["alembic", "upgrade", "head"], name
    worker_check = " ".join(SERVICES["worker"]["healthcheck"]["test"])
    assert "crypto_client.worker.celery_app" in worker_check
    assert importlib.import_module("crypto_client.worker.celery_app").app.main == "crypto_client"


def test_healthchecks_and_start_order() -> None:
    for name in ("db", "redis", "api"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(SERVICES["db"]["healthcheck"]["test"])
    assert "/health" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name in APP_SERVICES:
        depends = SERVICES[name]["depends_on"]
        assert depends["db"]["condition"] == "service_healthy", name
        if name != "migrate":
            assert depends["redis"]["condition"] == "service_healthy", name
            assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert "restart" in SERVICES[name], name
    assert SERVICES["migrate"]["restart"] == "no"


def test_configuration_comes_from_env_without_hardcoded_passwords() -> None:
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${"), f"{name}: {key} is hard-coded"
            assert "change-me" not in str(value), name
    for name in APP_SERVICES:
        assert SERVICES[name]["env_file"] == ".env", name
    # The seed's psql command: database `crypto`, user `app`.
    example = env_example_variables()
    assert (example["POSTGRES_DB"], example["POSTGRES_USER"]) == ("crypto", "app")


def test_variables_read_by_services_are_in_env_example() -> None:
    example = set(env_example_variables())
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", text))
    for name in APP_SERVICES:
        interpolated |= set(SERVICES[name].get("environment", {})) - {"TEST_DATABASE_URL"}
    assert interpolated <= example, interpolated - example


def test_settings_env_example_and_the_configuration_table_agree() -> None:
    settings = settings_variables()
    example = set(env_example_variables())
    assert settings == example, (settings - example, example - settings)
    page = (ROOT / "docs/configuration.md").read_text()
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", page, re.MULTILINE))
    assert settings == table, (settings - table, table - settings)


def test_env_example_is_valid_for_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env_example_variables().items():
        monkeypatch.setenv(name, value)
    loaded = load_settings()
    assert loaded.database_url_value.startswith("postgresql://app:change-me@db:5432/crypto")


def test_dockerfile_final_stage_is_non_root_and_locked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    final = list(stages)[-1]
    assert final == "runtime"
    users = [line.split()[1] for line in stages[final] if line.startswith("USER")]
    assert users
    assert users[-1] not in ("root", "0")
    assert any(line.startswith("USER app") for line in stages["test"])
    # The test stage carries what the suite reads, so `docker compose run --rm api pytest -q` works.
    copied = " ".join(line for line in stages["test"] if line.startswith("COPY"))
    for needed in ("tests", "bench", "README.md", "docker-compose.yml", ".env.example", "pyproject.toml"):
        assert needed in copied, needed
    # The image runs the Python minor version that mypy and CI check.
    python_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    assert f"FROM python:{python_version}-slim AS base" in text
    assert "uv sync --locked" in text
    assert "HEALTHCHECK" in text
    # Dependencies are installed before the source is copied, so they stay cached.
    builder = stages["builder"]
    first_sync = next(i for i, line in enumerate(builder) if "uv sync --locked" in line)
    source_copy = next(i for i, line in enumerate(builder) if line.startswith("COPY src"))
    assert first_sync < source_copy


def test_no_secrets_in_docker_files() -> None:
    for name in ("Dockerfile", "docker-compose.yml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"(PASSWORD|SECRET|TOKEN)\s*=\s*\S+", text), name
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "*.db", ".env", "**/__pycache__"):
        assert entry in ignored


def test_compose_commands_parse_as_the_cli_expects() -> None:
    # The api's command must bind all interfaces inside the container.
    command = SERVICES["api"]["command"]
    assert shlex.join(command).endswith("--host 0.0.0.0 --port 8000")
    # One host port per replica of the API.
    replicas = SERVICES["api"]["deploy"]["replicas"]
    assert SERVICES["api"]["ports"] == [f"8000-{8000 + replicas - 1}:8000"]
    assert replicas >= 2
    assert SERVICES["worker"]["deploy"]["replicas"] >= 2
