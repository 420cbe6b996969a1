"""`/livez` latency of a real `crypto-client api` under idle connections and a full stream cap.

    uv run python -m bench.server_limits [--idle 2000] [--streams 100] [--samples 300]

Each sample is a new TCP connection sending one request and reading the whole answer, as a
load balancer's probe does. Three conditions, one server: quiet; with `--idle` connections
that never send a byte; and with those plus `--streams` open `/prices/stream` clients, the
cap (`API_MAX_STREAMS`) set to that number so it is reached. Prints a Markdown section.
"""

import argparse
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.report import machine
from crypto_client.db import migrations
from tests.support.services import ApiServer, crypto_client, free_port

_PROBE = b"GET /livez HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
_STREAM = b"GET /prices/stream HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"


def _probe(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(_PROBE)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    elapsed = time.perf_counter() - started
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/livez answered {answer[:60]!r}")
    return elapsed


def _latency(port: int, samples: int) -> str:
    times = sorted(_probe(port) for _ in range(samples))
    p50 = statistics.median(times) * 1000
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {times[-1] * 1000:.1f} ms ({samples} probes)"


def _open_stream(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(_STREAM)
    head = b""
    while b"\r\n\r\n" not in head:
        head += connection.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/prices/stream answered {head[:60]!r}")
    return connection


def run(idle: int, streams: int, samples: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    url = f"sqlite:///{work / 'bench.db'}"
    migrations.upgrade(url)
    env = {"DATABASE_URL": url, "API_MAX_STREAMS": str(streams), "LOG_LEVEL": "WARNING"}
    port = free_port()
    rows: list[tuple[str, str]] = []
    with (
        ApiServer(crypto_client("api", "--port", str(port)), env, work / "api.log", port=port) as _api,
        ExitStack() as held,
    ):
        rows.append(("quiet", _latency(port, samples)))
        for _ in range(idle):
            held.callback(socket.create_connection(("127.0.0.1", port)).close)
        rows.append((f"{idle:,} idle connections", _latency(port, samples)))
        for _ in range(streams):
            held.callback(_open_stream(port).close)
        refused = socket.create_connection(("127.0.0.1", port), timeout=10)
        refused.sendall(_STREAM)
        status = refused.recv(4096).split(b"\r\n", 1)[0].decode()
        refused.close()
        rows.append(
            (f"{idle:,} idle + {streams} streams (cap reached: next got `{status}`)", _latency(port, samples))
        )
    lines = [
        "### `/livez` under idle connections and a full stream cap (`python -m bench.server_limits`)",
        "",
        f"Machine: {machine()}. One `crypto-client api` worker on SQLite; each probe is a new connection.",
        "",
        "| Condition | `/livez` latency |",
        "| --- | --- |",
    ]
    lines += [f"| {condition} | {figures} |" for condition, figures in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--samples", type=int, default=300)
    options = parser.parse_args()
    print("\n".join(run(options.idle, options.streams, options.samples)))


if __name__ == "__main__":
    main()
