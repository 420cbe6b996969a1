"""The HTTP server under every API process: granian, a Rust ASGI server.

Chosen on numbers (bench/RESULTS.md): against uvicorn with httptools and uvloop on the same
app and machine, it answers more requests per second and has no 100 ms+ tail at p99.9.
"""

from granian import Granian
from granian.constants import Interfaces


def serve(factory: str, *, host: str, port: int, workers: int = 1) -> None:
    """Run the ASGI app that `factory` ("module:function") builds, in each worker process,
    until SIGINT or SIGTERM; the app's lifespan starts and stops with each worker."""
    Granian(
        factory,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=workers,
        # Our own request log and start-up line say what granian's would.
        log_enabled=False,
        # A tick writing gets one second to commit (see the embedded scheduler); then stop.
        workers_kill_timeout=5,
    ).serve()
