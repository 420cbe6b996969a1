"""The launcher's own process (`python -m tests.support.fork_server SOCKET`): imports the
libraries of `crypto-client` once, then forks a child for each command a test process asks
for on the socket, and reports each child's exit status on the connection that asked.
The test process's side, and why, is `tests/support/launcher.py`."""

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
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

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
MODULE = "crypto_client"
MAX_MESSAGE = 1 << 20


def _serve(path: str) -> None:
    for module in PRELOADED:
        __import__(module)
    leaked = [name for name in NEVER_PRELOADED if name in sys.modules]
    assert not leaked, f"preloading imported {leaked}"
    assert threading.active_count() == 1, "a preloaded library started a thread: forking would be unsafe"
    gc.freeze()  # the imported objects stay shared with the children, not copied on first touch
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the test's group is for the test
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
                _start_child(listener.accept()[0], children)
            elif key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _report_exits(children)
            elif not os.read(0, 4096):  # the test process closed its end, or ended
                return


def _start_child(connection: socket.socket, children: dict[int, socket.socket]) -> None:
    """One request: fork the child it asks for and reply with its pid, or with why not. A bad
    request fails its command, never the launcher."""
    fds: list[int] = []
    try:
        message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"a request carries 3 descriptors, not {len(fds)}")
        started_read, started_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            _run_child(request, fds, started_write)
        os.close(started_write)
        # As Popen does, reply once the child is what was asked for (its session or group,
        # descriptors, directory), or say why it could not be.
        with open(started_read, "rb") as started:
            problem = started.read().decode()
        reply: dict[str, object] = {"error": problem} if problem else {"pid": pid}
    except Exception as exc:
        reply = {"error": repr(exc)}
    finally:
        for fd in fds:
            os.close(fd)
    with contextlib.suppress(OSError):  # the test gave up waiting
        connection.send(json.dumps(reply).encode())
    if "pid" in reply:
        children[int(str(reply["pid"]))] = connection
    else:
        connection.close()


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
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if request["new_session"]:
            os.setsid()
        else:  # the test process's group, where Popen leaves a child
            os.setpgid(0, request["process_group"])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, started)
        os.closerange(started + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()
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
    interrupted = False
    try:
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        sys.excepthook(type(exc), exc, _without_this_module(exc.__traceback__))
        code = 1
    code = _shut_down(code)
    if interrupted:  # an interpreter that ends on Ctrl-C ends by the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _without_this_module(trace: TracebackType | None) -> TracebackType | None:
    while trace is not None and trace.tb_frame.f_code.co_filename == __file__:
        trace = trace.tb_next
    return trace


def _shut_down(code: int) -> int:
    """The interpreter's end: non-daemon threads joined, atexit run, the streams flushed (120
    when that fails). Not the finalisers of what is left: the child ends with `os._exit`."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:
        sys.excepthook(*sys.exc_info())
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = 120
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
