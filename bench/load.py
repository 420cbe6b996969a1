"""Load generation: `wrk` where installed, a small Python generator elsewhere."""

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

WRK_INSTALL = "apt-get install -y wrk   (Debian/Ubuntu; or build it from https://github.com/wg/wrk)"


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    non_2xx: int
    errors: int


# wrk's --latency table stops at p99; its Lua hook can print any percentile (microseconds).
_PERCENTILES_LUA = """
done = function(summary, latency, requests)
  for _, p in pairs({50, 99, 99.9}) do
    io.write(string.format("percentile %g %d\\n", p, latency:percentile(p)))
  end
end
"""


def run_wrk(url: str, seconds: float, connections: int, headers: Mapping[str, str] | None = None) -> Load:
    threads = min(2, connections)
    duration = f"-d{max(1, round(seconds))}s"
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_PERCENTILES_LUA)
        script.flush()
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            duration,
            "--timeout",
            "60s",
            "-s",
            script.name,
            *(f"-H{name}: {value}" for name, value in (headers or {}).items()),
            url,
        ]
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=seconds + 120
        ).stdout
    latency = {
        p: int(us) / 1000 for p, us in re.findall(r"^percentile ([\d.]+) (\d+)$", output, re.MULTILINE)
    }
    if set(latency) != {"50", "99", "99.9"}:
        raise RuntimeError(f"could not read wrk's latency distribution:\n{output}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Load(
        rps=rps,
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        p999_ms=latency["99.9"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def run_python_load(
    url: str, seconds: float, connections: int, headers: Mapping[str, str] | None = None
) -> Load:
    """A small closed-loop load generator, for machines without wrk (the CI smoke run)."""

    async def main() -> Load:
        latencies: list[float] = []
        failures = 0
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=10, headers=dict(headers or {})) as client:

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
        quantiles = statistics.quantiles(latencies, n=1000)
        return Load(len(latencies) / elapsed, quantiles[499], quantiles[989], quantiles[998], failures, 0)

    return asyncio.run(main())


def load(url: str, seconds: float, connections: int, headers: Mapping[str, str] | None = None) -> Load:
    """`wrk` when installed, else the Python load generator."""
    if shutil.which("wrk"):
        return run_wrk(url, seconds, connections, headers)
    return run_python_load(url, seconds, connections, headers)
