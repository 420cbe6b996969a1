"""The service's API app as `crypto-client api` runs it, plus one endpoint that touches no
database: the framework's ceiling, measured on the same server."""

import sys

import uvicorn
from fastapi import FastAPI

from crypto_client.api.app import create_app
from crypto_client.config import get_settings
from crypto_client.logging import setup_logging


def bench_app() -> FastAPI:
    app = create_app()

    @app.get("/bench/ping", include_in_schema=False)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


if __name__ == "__main__":
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    uvicorn.run(bench_app(), host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False)
