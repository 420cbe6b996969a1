"""The suite's launcher (tests/support/launcher.py): a forked command must be
indistinguishable, to the test, from one the interpreter started afresh."""

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import launcher
from tests.support.services import crypto_client, free_port, port_open
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def both(
    args: list[str], env: dict[str, str], cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[tuple[int, str, str], ...]:
    """What the test sees of one command, forked and started afresh."""
    results = []
    for fresh in (False, True):
        if fresh:
            monkeypatch.setenv("TEST_FRESH_PROCESSES", "1")
        done = launcher.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        results.append((done.returncode, done.stdout, done.stderr))
    monkeypatch.delenv("TEST_FRESH_PROCESSES")
    return tuple(results)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--version"], {}),
        (["no-such-command"], {}),
        (["migrate"], {"DATABASE_URL": "mysql://x@y/z"}),
        (["ingest"], {"INGEST_INTERVAL_SECONDS": "soon"}),
        (["no-such-command"], {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}),
    ],
    ids=["version", "usage-error", "bad-database", "bad-setting", "interpreter-settings-redone"],
)
def test_a_forked_command_prints_and_exits_as_a_fresh_one(
    args: list[str], env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forked, fresh = both(crypto_client(*args), {"PATH": "/usr/bin:/bin", **env}, tmp_path, monkeypatch)
    assert forked == fresh
    assert forked[1] or forked[2]  # the command said something, to stdout or stderr


def test_the_working_directory_and_environment_are_the_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `crypto-client` reads a `.env` file from its working directory.
    (tmp_path / ".env").write_text("INGEST_INTERVAL_SECONDS=never\n")
    forked, fresh = both(crypto_client("ingest"), {"PATH": "/usr/bin:/bin"}, tmp_path, monkeypatch)
    assert forked == fresh
    assert forked[0] != 0
    assert "INGEST_INTERVAL_SECONDS" in forked[2]


def test_a_forked_server_is_its_own_session_and_dies_by_the_signal_it_is_sent(tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "sim.log").open("wb") as log:
        process = launcher.Popen(
            crypto_client("sim", "--port", str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert psutil.Process(process.pid).ppid() != os.getpid()  # the launcher's child
        assert os.getsid(process.pid) == process.pid
        wait_until(lambda: port_open(port), 20, what="the simulator")
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(20) == -signal.SIGTERM  # uvicorn ends by the signal, as it would afresh
        assert "Finished server process" in (tmp_path / "sim.log").read_text()
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PYTHONHASHSEED", "7"), ("TEST_FRESH_PROCESSES", "1")],
    ids=["interpreter", "switch"],
)
def test_what_the_launcher_cannot_honour_starts_afresh(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another interpreter setting, or the switch, and the command is the test's own child."""
    launcher.run(crypto_client("--version"), check=True, capture_output=True)  # the launcher runs, and
    monkeypatch.setenv(variable, value)  # this is not the environment it was started in
    process = launcher.Popen(
        crypto_client("sim", "--port", str(free_port())), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert psutil.Process(process.pid).ppid() == os.getpid()
    finally:
        process.kill()
        process.wait(10)


_READS_THE_ENVIRONMENT = re.compile(
    r"""\b(?:environ\.get|getenv)\(\s*["']([A-Z_]+)["']|\benviron\[["']([A-Z_]+)["']\]"""
)


def test_every_variable_a_preloaded_library_reads_at_import_starts_a_command_afresh() -> None:
    """A library upgrade that reads a new variable at import would otherwise hand every
    forked command the launcher's value. Module-level code only: what a library reads in the
    functions it calls at import (OpenTelemetry) is in the list by hand."""
    probe = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n" + _LOADED_SOURCES
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    read: set[str] = set()
    for source in loaded.stdout.split():
        text = Path(source).read_text()
        if "environ" not in text and "getenv" not in text:
            continue  # nothing the pattern could match: most modules, and parsing is the cost
        for code in _run_at_import(ast.parse(text).body):
            read.update(match[1] or match[2] for match in _READS_THE_ENVIRONMENT.finditer(ast.unparse(code)))
    assert "NO_COLOR" in read  # structlog's, so the scan sees what it looks for
    assert {name for name in read if not name.startswith(launcher.STARTUP_VARIABLES)} == set()


def _run_at_import(body: list[ast.stmt]) -> list[ast.AST]:
    """The code of a module or class body that runs when it does: not the bodies of its
    functions, but their decorators and defaults."""
    code: list[ast.AST] = []
    for statement in body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            code += [*statement.decorator_list, *statement.args.defaults]
            code += [default for default in statement.args.kw_defaults if default is not None]
        elif isinstance(statement, ast.ClassDef):
            code += [*statement.decorator_list, *statement.bases, *_run_at_import(statement.body)]
        else:
            code.append(statement)
    return code


_LOADED_SOURCES = """
import sys
from tests.support.fork_server import PRELOADED
standard = set(sys.stdlib_module_names)
before = set(sys.modules)
for module in PRELOADED:
    __import__(module)
for name, module in sorted(sys.modules.items()):
    path = getattr(module, "__file__", None) or ""
    if name not in before and name.split(".")[0] not in standard and path.endswith(".py"):
        print(path)
"""


def test_a_child_outside_a_new_session_is_in_the_tests_process_group(tmp_path: Path) -> None:
    env: dict[str, str | Path] = {**os.environ, "HOME": tmp_path}  # Popen takes paths too
    process = launcher.Popen(
        crypto_client("sim", "--port", str(free_port())),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert psutil.Process(process.pid).ppid() != os.getpid()
        assert os.getpgid(process.pid) == os.getpgrp()
    finally:
        process.kill()
        assert process.wait(10) == -signal.SIGKILL


def test_a_request_it_cannot_read_fails_alone_and_the_launcher_goes_on() -> None:
    launcher.run(crypto_client("--version"), check=True, capture_output=True)
    assert launcher._launcher is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.connect(launcher._launcher.path)
        connection.send(b"not a request")
        assert "error" in json.loads(connection.recv(4096))
    done = launcher.run(crypto_client("--version"), capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.startswith("crypto-client ")) == (0, True)
