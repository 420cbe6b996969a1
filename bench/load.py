"""Load generation: `wrk` where installed, a small Python generator elsewhere."""

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass

import httpx

WRK_INSTALL = "apt-get install -y wrk   (Debian/Ubuntu; or build it from https://github.com/wg/wrk)"


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(url: str, seconds: float, connections: int) -> Load:
    threads = min(2, connections)
    duration = f"-d{max(1, round(seconds))}s"
    command = ["wrk", f"-t{threads}", f"-c{connections}", duration, "--timeout", "60s", "--latency", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
    latency = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", output, re.MULTILINE))
    if set(latency) != {"50", "99"}:
        raise RuntimeError(f"could not read wrk's latency distribution:\n{output}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Load(
        rps=rps,
        p50_ms=_duration_ms(latency["50"]),
        p99_ms=_duration_ms(latency["99"]),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def run_python_load(url: str, seconds: float, connections: int) -> Load:
    """A small closed-loop load generator, for machines without wrk (the CI smoke run)."""

    async def main() -> Load:
        latencies: list[float] = []
        failures = 0
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=10) as client:

            async def loop() -> None:
                nonlocal failures
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    response = await client.get(url)
                    latencies.append((time.perf_counter() - started) * 1000)
                    failures += not response.is_success

            began = time.monotonic()
            await asyncio.gather(*(loop() for _ in range(connections)))
            elapsed = time.monotonic() - began
        quantiles = statistics.quantiles(latencies, n=100)
        return Load(len(latencies) / elapsed, quantiles[49], quantiles[98], failures, 0)

    return asyncio.run(main())


def load(url: str, seconds: float, connections: int) -> Load:
    """`wrk` when installed, else the Python load generator."""
    if shutil.which("wrk"):
        return run_wrk(url, seconds, connections)
    return run_python_load(url, seconds, connections)
