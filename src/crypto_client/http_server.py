"""The HTTP server under every API process: granian, a Rust ASGI server.

Chosen on numbers (bench/RESULTS.md): against uvicorn with httptools and uvloop on the same
app and machine, it answers more requests per second and has no 100 ms+ tail at p99.9.
"""

import asyncio
import ctypes
import importlib
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any

import structlog
from granian import Granian
from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.server.embed import Server as EmbeddedServer

log = structlog.get_logger(__name__)

_FACTORY_VARIABLE = "CRYPTO_CLIENT_APP_FACTORY"
_SERVER_PID_VARIABLE = "CRYPTO_CLIENT_SERVER_PID"
_PR_SET_PDEATHSIG = 1
# Descriptors kept for everything but client connections: database pools, logs, Redis.
_RESERVED_FILES = 256
_STOP_TIMEOUT_SECONDS = 5


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (a soft 1,024 would
    cap clients at about a thousand); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def serve(factory: str, *, host: str, port: int, workers: int = 1, idle_timeout_seconds: float = 15) -> None:
    """Run the ASGI app that `factory` ("module:function") builds until SIGINT or SIGTERM;
    the app's lifespan starts and stops with it.

    One worker runs in this process (granian's embedded server): a supervising process would
    cost a second interpreter's start-up and memory for nothing. More run as child processes,
    each building the app.

    A connection is closed when it stays idle between requests, or takes longer to send its
    request headers, than `idle_timeout_seconds` (granian's header read timeout covers both).
    """
    open_files = raise_open_file_limit()
    # Granian admits this many connections per worker and leaves the rest in the backlog.
    connections_per_worker = max(64, (open_files - _RESERVED_FILES) // workers)
    log.info("http server limits", open_files=open_files, connections_per_worker=connections_per_worker)
    options: dict[str, Any] = {
        "address": host,
        "port": port,
        "interface": Interfaces.ASGI,
        "factory": True,
        "backpressure": connections_per_worker,
        "http1_settings": HTTP1Settings(header_read_timeout=round(idle_timeout_seconds * 1000)),
        # Our own request log and start-up line say what granian's would.
        "log_enabled": False,
    }
    if workers == 1:
        _serve_in_process(_app_factory(factory), options)
        return
    # The worker processes read them: which app to build, and whose death ends them.
    os.environ[_FACTORY_VARIABLE] = factory
    os.environ[_SERVER_PID_VARIABLE] = str(os.getpid())
    Granian(
        f"{__name__}:worker_app",
        workers=workers,
        # A tick writing gets one second to commit (see the embedded scheduler); then stop.
        workers_kill_timeout=_STOP_TIMEOUT_SECONDS,
        **options,
    ).serve()


def _serve_in_process(factory: Callable[[], Any], options: dict[str, Any]) -> None:
    server = EmbeddedServer(factory, **options)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, server.stop)
        try:
            await server.serve()
        except TimeoutError:
            log.warning("the app did not stop in time; stopping anyway", seconds=_STOP_TIMEOUT_SECONDS)

    server.workers_kill_timeout = _STOP_TIMEOUT_SECONDS
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed, as granian's own worker processes choose."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _app_factory(factory: str) -> Callable[[], Any]:
    module, _, function = factory.partition(":")
    built: Callable[[], Any] = getattr(importlib.import_module(module), function)
    return built


def worker_app() -> Any:
    """The app of one server worker process, which ends when the server process dies."""
    _end_with_server()
    return _app_factory(os.environ[_FACTORY_VARIABLE])()


def _end_with_server() -> None:
    """End this worker when the server process dies, even by `kill -9`: an orphaned worker
    would hold the port and, under `serve`, keep ingesting.

    SIGKILL, not SIGTERM: a SIGTERM arriving while the worker still starts, before granian
    listens for it, was seen to leave the worker running. Whatever a killed worker was writing
    is rolled back by the database, never half-stored.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("cannot ask for a signal at the server's death", errno=ctypes.get_errno())
    if os.getppid() != int(os.environ.get(_SERVER_PID_VARIABLE, os.getppid())):
        os._exit(1)  # orphaned before the request took effect: nothing has started yet
