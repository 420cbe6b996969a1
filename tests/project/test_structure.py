"""The layout's contracts: what may import what, and the one definition of shared shapes."""

import ast
from pathlib import Path

import pytest

from crypto_client.api.schemas import PriceOut
from crypto_client.config import Settings, SettingsError, load_settings
from crypto_client.domain import PriceRow

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "crypto_client"


def imported_modules(directory: Path) -> set[str]:
    modules: set[str] = set()
    for path in directory.rglob("*.py"):
        modules |= imported_modules_of(path)
    return modules


def imported_modules_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `source` (the code of `module`) imports, by its absolute name."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                modules.add(f"{base}.{node.module}")
            else:
                modules.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_the_layer_checks_see_relative_imports_by_their_absolute_names() -> None:
    source = "from . import candles\nfrom .export import x\nfrom ...ingestion import tick\nimport os\n"
    assert imports_in(source, "crypto_client.api.routes.prices") == {
        "crypto_client.api.routes.candles",
        "crypto_client.api.routes.export",
        "crypto_client.ingestion",
        "os",
    }
    assert imports_in("from .tick import ingest_tick", "crypto_client.ingestion", is_package=True) == {
        "crypto_client.ingestion.tick"
    }
    assert "crypto_client.api.errors" in imported_modules_of(PACKAGE / "api" / "routes" / "prices.py")


def test_the_api_imports_nothing_from_ingestion() -> None:
    forbidden = (
        "crypto_client.ingestion",
        "crypto_client.worker",
        "crypto_client.clients",
        "crypto_client.serve",
    )
    leaks = {module for module in imported_modules(PACKAGE / "api") if module.startswith(forbidden)}
    assert leaks == set()


def test_the_db_layer_imports_nothing_above_it() -> None:
    above = (
        "crypto_client.api",
        "crypto_client.ingestion",
        "crypto_client.worker",
        "crypto_client.clients",
        "crypto_client.coverage",
        "crypto_client.serve",
        "crypto_client.cli",
    )
    leaks = {module for module in imported_modules(PACKAGE / "db") if module.startswith(above)}
    assert leaks == set()


def test_config_imports_nothing_from_the_layers_that_read_it() -> None:
    """Config sits below the layers: neither it nor anything it imports (at module level)
    loads the API, ingestion, worker or database code; what they and config both parse lives
    in `setting_values`."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    layers = ("api", "ingestion", "worker", "db", "clients", "cli")
    above = tuple(f"crypto_client.{layer}" for layer in layers)
    reached, pending = set(), ["crypto_client.config"]
    while pending:
        name = pending.pop()
        reached.add(name)
        pending += sorted(_module_level_imports(modules[name], set(modules)) - reached)
    assert "crypto_client.setting_values" in reached  # the walk follows config's imports
    assert {name for name in reached if name.startswith(above)} == set()
    # Nor inside a function of config's.
    config_imports = imported_modules_of(modules["crypto_client.config"])
    assert {module for module in config_imports if module.startswith(above)} == set()


def test_each_route_module_stands_alone() -> None:
    """A resource's routes import no other resource's: what they share lives in `api/`."""
    routes = [path for path in (PACKAGE / "api" / "routes").glob("*.py") if path.name != "__init__.py"]
    assert len(routes) >= 8
    for path in routes:
        imports = imported_modules_of(path)
        assert not any(module.startswith("crypto_client.api.routes") for module in imports), path.name


def test_no_import_cycles() -> None:
    """Module-level imports between the package's modules form no cycle (imports inside
    functions, which the command line uses to choose when a library loads, are left out)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _module_level_imports(path, set(modules)) for name, path in modules.items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        visiting.append(name)
        for imported in sorted(graph[name]):
            assert imported not in visiting, " -> ".join([*visiting[visiting.index(imported) :], imported])
            if imported not in done:
                visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name)
    assert "crypto_client.api.routes.prices" in graph["crypto_client.api.routes"]  # the walk sees packages


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def test_only_the_source_factory_names_a_concrete_client() -> None:
    """A second exchange is a new client package and a choice in `clients/factory.py`:
    ingestion, the worker and the commands see only the protocols of `clients/source.py`."""
    concrete = ("crypto_client.clients.deribit",)
    namers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(PACKAGE / "clients" / "deribit")
        if any(module.startswith(concrete) for module in imported_modules_of(path))
    }
    assert namers == {"clients/factory.py"}
    ingestion_imports = imported_modules(PACKAGE / "ingestion")
    assert "crypto_client.clients.source" in ingestion_imports
    assert "crypto_client.clients.factory" in ingestion_imports


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


MAX_MODULE_LINES = 400


def test_no_source_module_is_over_four_hundred_lines() -> None:
    root = PACKAGE.parents[1]
    sources = [root / "src", root / "bench", root / "sdk" / "src", root / "alembic"]
    too_long = {
        str(path.relative_to(root)): lines
        for folder in sources
        for path in folder.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}
