"""Where prices come from: the rule that names a source's origin.

A database records the origin of its first write and refuses writers of another origin
(`db.writer.PriceWriter`), so that made-up prices never mix with real ones. An origin is
Deribit's host as configured (`www.deribit.com`, `test.deribit.com`, ...) or `simulator`:
this project's simulator says so itself in a response header, on whatever host and port it
runs; its URL alone proves nothing.
"""

from typing import Protocol
from urllib.parse import urlsplit

SIMULATOR_ORIGIN = "simulator"
# Every answer of `crypto-client sim` (HTTP, and the WebSocket handshake) carries it.
SIMULATOR_HEADER = "X-Crypto-Client-Simulator"

# Hosts that serve the same production index as www.deribit.com: Deribit's bare domain, and
# Coinbase's host for Deribit (the same exchange's public market data, from 2026-09-09 for new
# users). Testnet (test.deribit.com) is another environment with other prices: its own origin.
_PRODUCTION = "www.deribit.com"
_SAME_AS_PRODUCTION = frozenset({"deribit.com", "drb.coinbase.com"})
_DERIBIT_HOSTS = frozenset({_PRODUCTION, "test.deribit.com", *_SAME_AS_PRODUCTION})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_of(url: str, *, simulator: bool) -> str:
    """The origin of prices served at `url`: `simulator` when the server said it is the
    simulator, else the host (with a port other than the default), Deribit's aliases as one."""
    if simulator:
        return SIMULATOR_ORIGIN
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in _SAME_AS_PRODUCTION:
        host = _PRODUCTION
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        return f"{host}:{parts.port}"
    return host


def is_deribit_host(url: str) -> bool:
    """Whether `url` names one of Deribit's own hosts, whose origin is known without asking."""
    return (urlsplit(url).hostname or "").lower() in _DERIBIT_HOSTS


class OriginSource(Protocol):
    """What a price source tells about itself (every source in `clients/` does)."""

    @property
    def origin(self) -> str: ...

    @property
    def answered(self) -> bool:
        """Whether `origin` is the server's word (it has answered), not only its URL's."""
        ...
