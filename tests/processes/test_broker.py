"""The worker and beat reach Redis through `crypto_client.worker.broker`'s transport, the one
that survives a Redis restart with a tick in flight (`test_celery.py` tests that restart)."""

import json
import subprocess
import sys

import pytest

# The broker connection a fresh process makes, as the worker's does.
_PROBE = """
import json
from crypto_client.worker.celery_app import celery_app
connection = celery_app.connection_for_read()
transport = type(connection.transport)
print(json.dumps({
    "transport": f"{transport.__module__}:{transport.__qualname__}",
    "scheme": connection.transport_cls,
    "tls": bool(connection.ssl),
}))
"""


@pytest.mark.parametrize(
    ("url", "tls"), [("redis://127.0.0.1:6379/0", False), ("rediss://127.0.0.1:6380/0", True)]
)
def test_redis_broker_urls_use_the_transport_that_survives_a_restart(url: str, tls: bool) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={"PATH": "/usr/bin:/bin", "CELERY_BROKER_URL": url},
        capture_output=True,
        text=True,
        check=True,
    )
    view = json.loads(result.stdout.strip().splitlines()[-1])
    assert view["transport"] == "crypto_client.worker.broker:Transport"
    # The URL's scheme still names the transport: kombu's TLS for rediss:// is kept.
    assert view["scheme"] == url.split(":", 1)[0]
    assert view["tls"] is tls
