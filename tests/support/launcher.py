"""`crypto-client` commands forked from a parent that has imported their libraries once.

A test process starts about a hundred commands (servers, workers, one-shot commands), and a
fresh interpreter spends about 1 CPU s importing SQLAlchemy, pydantic, FastAPI, Celery and the
rest before the command runs: most of the suite's CPU on a 2-core machine. So each test
process keeps one launcher (`python -m tests.support.launcher`) that imports those libraries,
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
import gc
import io
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

PRELOADED = (
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "sqlalchemy.dialects.sqlite.aiosqlite",
    "asyncpg",
    "aiosqlite",
    "alembic.command",
    "alembic.runtime.migration",
    "pydantic",
    "pydantic_settings",
    "fastapi",
    "fastapi.responses",
    "starlette.applications",
    "sse_starlette",
    "uvicorn.main",
    "typer",
    "rich.console",
    "structlog",
    "httpx",
    "websockets.asyncio.client",
    "anyio",
    "orjson",
    "limits.aio.storage",
    "celery",
    "kombu",
    "redis.asyncio",
    "tenacity",
    "yaml",
)
NEVER_PRELOADED = ("crypto_client", "prometheus_client", "pyarrow")
_MODULE = "crypto_client"
_MAX_MESSAGE = 1 << 20


def _launchable(args: Sequence[Any]) -> list[str] | None:
    """The command line after `python -m crypto_client`, if `args` is one."""
    if len(args) < 3 or list(args[:3]) != [sys.executable, "-m", _MODULE]:
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


class _Launcher:
    """The test process's side: starts the launcher once, asks it for children."""

    def __init__(self) -> None:
        directory = tempfile.mkdtemp(prefix="cc-launcher-")
        self.path = str(Path(directory) / "socket")
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, self.path],
            env=self.env,
            stdin=subprocess.PIPE,  # its end is the launcher's cue to exit
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
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
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            connection.connect(self.path)
            request = {"argv": argv, "env": dict(env), "cwd": cwd, "new_session": new_session}
            socket.send_fds(connection, [json.dumps(request).encode()], fds)
            reply = json.loads(connection.recv(_MAX_MESSAGE))
            if "error" in reply:
                raise subprocess.SubprocessError(f"the launcher could not start {argv}: {reply['error']}")
        except BaseException:
            connection.close()
            raise
        return int(reply["pid"]), connection


_launcher: _Launcher | None = None


def _the_launcher() -> _Launcher:
    global _launcher
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


# The launcher's side.


def _serve(path: str) -> None:
    for module in PRELOADED:
        __import__(module)
    leaked = [name for name in NEVER_PRELOADED if name in sys.modules]
    assert not leaked, f"preloading imported {leaked}"
    assert threading.active_count() == 1, "a preloaded library started a thread: forking would be unsafe"
    gc.freeze()  # the imported objects stay shared with the children, not copied on first touch
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    selector.register(0, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    os.write(1, b"ready\n")
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                connection, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 3)
                started_read, started_write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _run_child(json.loads(message), fds, started_write)
                for fd in (*fds, started_write):
                    os.close(fd)
                # As Popen does, return once the child is what was asked for (its session,
                # descriptors, directory), or say why it could not be.
                with open(started_read, "rb") as started:
                    problem = started.read().decode()
                reply = {"error": problem} if problem else {"pid": pid}
                connection.send(json.dumps(reply).encode())
                children[pid] = connection
            elif key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _report_exits(children)
            elif not os.read(0, 4096):  # the test process closed its end, or ended
                return


def _report_exits(children: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is not None:
            with contextlib.suppress(OSError):  # the test no longer waits for it
                connection.send(str(status).encode())
            connection.close()


def _run_child(request: dict[str, Any], fds: list[int], started: int) -> None:
    """In the forked child: become the process the test asked for, run the command, exit."""
    code = 127
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, started)
        os.closerange(started + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _redo_interpreter_start()
        sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
        sys.argv = [sys.executable, *request["argv"]]
    except BaseException as exc:
        os.write(started, repr(exc).encode())
        os._exit(code)
    os.close(started)
    try:
        code = _run_module()
    finally:
        os._exit(code)


_launchers_streams: list[TextIO] = []


def _redo_interpreter_start() -> None:
    """Standard streams and bytecode writing as this environment makes them in a fresh
    interpreter. The launcher's own streams stay referenced: collected, they would close
    descriptors 1 and 2."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    _launchers_streams.extend((sys.stdout, sys.stderr))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        previous: TextIO = getattr(sys, name)
        binary = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115
        stream = io.TextIOWrapper(
            binary,
            encoding=previous.encoding,
            errors=previous.errors,
            line_buffering=not unbuffered and (fd == 2 or os.isatty(fd)),
            write_through=unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _run_module() -> int:
    """`python -m crypto_client`'s run and exit, as the interpreter does them."""
    streams: tuple[IO[str], ...] = (sys.stdout, sys.stderr)
    try:
        runpy.run_module(_MODULE, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # an interrupted interpreter ends by the signal
        code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    _serve(sys.argv[1])
