"""`crypto-client` commands forked from a parent that has imported their libraries once.

A test process starts about a hundred commands (servers, workers, one-shot commands), and a
fresh interpreter spends about 1 CPU s importing SQLAlchemy, pydantic, FastAPI, Celery and the
rest before the command runs: most of the suite's CPU on a 2-core machine. So each test
process keeps one launcher (`tests/support/fork_server.py`) that imports those libraries,
none of the service's own modules, and forks a child per command, as Celery's prefork pool and
gunicorn's `--preload` do. The child is a real process of its own: its own pid and session,
the file descriptors, environment, working directory and argv the test gave, and it runs
`python -m crypto_client` exactly as the interpreter would (`runpy`), imports of the service
included. `Popen` is `subprocess.Popen` with that one change; what the launcher cannot honour
(another program, `-c`, a variable read at import such as `PYTHONHASHSEED` or `NO_COLOR`
that differs from the launcher's, preexec hooks) is started the ordinary way.
`TEST_FRESH_PROCESSES=1` starts every command the ordinary way.

Not preloaded: prometheus_client (which reads its multiprocess directory at import), pyarrow
(its memory pool) and `crypto_client` itself.
"""

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support import fork_server


def _launchable(args: Sequence[Any]) -> list[str] | None:
    """The command line after `python -m crypto_client`, if `args` is one."""
    if len(args) < 3 or list(args[:3]) != [sys.executable, "-m", fork_server.MODULE]:
        return None
    if not all(isinstance(arg, str) for arg in args):
        return None
    return [str(arg) for arg in args[3:]]


# What the interpreter and the preloaded libraries read from the environment at import:
# a fork inherits the launcher's values, so a command whose environment differs in one of
# them starts afresh. Found by `tests/project/test_launcher.py`, which reads the libraries'
# module-level code; OpenTelemetry (which FastAPI and redis import) reads its variables in
# functions it calls at import.
STARTUP_VARIABLES = (
    "PYTHON",
    "PYDANTIC_",
    "OTEL_",
    "WEBSOCKETS_",
    "TYPER_",
    "KOMBU_",
    "WRAPT_",
    "C_IMPDEBUG",
    "NO_COLOR",
    "FORCE_COLOR",
)
# ... except these two, which the child redoes from its own environment.
_REDONE_IN_THE_CHILD = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")


def _startup_settings(env: Mapping[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in env.items()
        if key.startswith(STARTUP_VARIABLES) and key not in _REDONE_IN_THE_CHILD
    }


# The launcher's environment: the test process's as it started, before any test changed it.
_STARTING_ENVIRONMENT = dict(os.environ)


class _Launcher:
    """The test process's side: starts the launcher once, asks it for children."""

    def __init__(self) -> None:
        directory = tempfile.mkdtemp(prefix="cc-launcher-")
        self.path = str(Path(directory) / "socket")
        self.env = _STARTING_ENVIRONMENT
        self.process = subprocess.Popen(
            [sys.executable, "-m", fork_server.__name__, self.path],
            env=self.env,
            stdin=subprocess.PIPE,  # its end is the launcher's cue to exit
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if ready != b"ready\n":
            raise RuntimeError(f"the launcher did not start: {ready!r}")
        atexit.register(self.close, directory)

    def close(self, directory: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(directory)

    def fork(
        self, argv: list[str], env: Mapping[str, str], cwd: str, fds: list[int], new_session: bool
    ) -> tuple[int, socket.socket]:
        request = {
            "argv": argv,
            "env": {os.fsdecode(key): os.fsdecode(value) for key, value in env.items()},
            "cwd": os.path.abspath(cwd),
            "new_session": new_session,
            "process_group": os.getpgrp(),
        }
        message = json.dumps(request).encode()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            connection.connect(self.path)
            socket.send_fds(connection, [message], fds)
            connection.settimeout(60)  # the child's set-up, which Popen would wait for too
            reply = json.loads(connection.recv(fork_server.MAX_MESSAGE))
            if "error" in reply:
                raise subprocess.SubprocessError(f"the launcher could not start {argv}: {reply['error']}")
        except BaseException:
            connection.close()
            raise
        return int(reply["pid"]), connection


_launcher: _Launcher | None = None
_starting = threading.Lock()  # tests start commands from threads too (`asyncio.to_thread`)


def _the_launcher() -> _Launcher:
    global _launcher
    with _starting:
        if _launcher is None:
            _launcher = _Launcher()
        return _launcher


class Popen(subprocess.Popen[Any]):
    """`subprocess.Popen`, but a `python -m crypto_client` child is forked by the launcher.
    The launcher reports the child's exit status on the connection it was started through,
    which is where `wait` and `poll` look for it."""

    _launch: socket.socket | None = None

    def _execute_child(
        self,
        args: Any,
        executable: Any,
        preexec_fn: Any,
        close_fds: bool,
        pass_fds: Sequence[int],
        cwd: Any,
        env: Mapping[str, str] | None,
        startupinfo: Any,
        creationflags: int,
        shell: bool,
        p2cread: int,
        p2cwrite: int,
        c2pread: int,
        c2pwrite: int,
        errread: int,
        errwrite: int,
        restore_signals: bool,
        gid: Any,
        gids: Any,
        uid: Any,
        umask: int,
        start_new_session: bool,
        process_group: int,
    ) -> None:
        argv = None if shell or isinstance(args, str | bytes) else _launchable(args)
        environment = dict(os.environ if env is None else env)
        plain = (
            argv is None
            or os.environ.get("TEST_FRESH_PROCESSES") == "1"
            or executable is not None
            or preexec_fn is not None
            or not close_fds
            or pass_fds
            or (gid, gids, uid) != (None, None, None)
            or umask != -1
            or process_group != -1
        )
        launcher = None if plain else _the_launcher()
        if (
            argv is None
            or launcher is None
            or (_startup_settings(environment) != _startup_settings(launcher.env))
        ):
            super()._execute_child(  # type: ignore[misc]
                args,
                executable,
                preexec_fn,
                close_fds,
                pass_fds,
                cwd,
                env,
                startupinfo,
                creationflags,
                shell,
                p2cread,
                p2cwrite,
                c2pread,
                c2pwrite,
                errread,
                errwrite,
                restore_signals,
                gid,
                gids,
                uid,
                umask,
                start_new_session,
                process_group,
            )
            return
        fds = [
            fd if fd != -1 else inherited for fd, inherited in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))
        ]
        directory = os.fsdecode(cwd) if cwd is not None else os.getcwd()
        try:
            self.pid, self._launch = launcher.fork(argv, environment, directory, fds, start_new_session)
            self._child_created = True
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)  # type: ignore[attr-defined]

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        if self._launch is None:
            return super()._try_wait(wait_flags)  # type: ignore[misc,no-any-return]
        self._launch.setblocking(not wait_flags & os.WNOHANG)
        try:
            message = self._launch.recv(64)
        except BlockingIOError:
            return 0, 0
        if not message:
            raise ChildProcessError(f"the launcher ended before process {self.pid} did")
        self._launch.close()
        return self.pid, int(message)

    def _internal_poll(self, _deadstate: int | None = None, **kwargs: Any) -> int | None:
        if self._launch is None:
            return super()._internal_poll(_deadstate, **kwargs)  # type: ignore[misc,no-any-return]
        if self.returncode is None and self._waitpid_lock.acquire(False):  # type: ignore[attr-defined]
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)  # type: ignore[attr-defined]
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()  # type: ignore[attr-defined]
        return self.returncode


def run(
    args: Sequence[str],
    *,
    timeout: float | None = None,
    check: bool = False,
    **options: Any,
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run` through this module's `Popen`."""
    if options.pop("capture_output", False):
        options["stdout"] = options["stderr"] = subprocess.PIPE
    with Popen(args, **options) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
    if check and process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, stdout, stderr)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
