"""The service's API app as `crypto-client api` runs it, plus one endpoint that touches no
database: the framework's ceiling, measured on the same server.

    python -m bench.server PORT [uvicorn|granian]

Under granian the app is built in the worker process only (as `crypto-client api` builds it):
the main process, which supervises the worker, imports granian and nothing of the app.
"""

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI


def bench_app() -> "FastAPI":
    from crypto_client.api.app import create_app
    from crypto_client.config import get_settings
    from crypto_client.logging import setup_logging

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    @app.get("/bench/ping", include_in_schema=False)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = sys.argv[2] if len(sys.argv) > 2 else "uvicorn"
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(
            "bench.server:bench_app",
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGI,
            factory=True,
            log_enabled=False,
        ).serve()
    else:
        import uvicorn

        uvicorn.run(bench_app(), host="127.0.0.1", port=port, log_config=None, access_log=False)
