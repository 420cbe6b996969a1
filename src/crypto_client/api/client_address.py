"""The client's address: the connection's peer, unless that peer is a proxy named in
`FORWARDED_ALLOW_IPS`, whose `Forwarded` / `X-Forwarded-For` header is then believed.

A raw header is never believed by default: anyone can send one. Behind trusted proxies the
chain is read from the right (the entry the nearest proxy appended) past every trusted hop;
the first address that is not a trusted proxy is the client.
"""

import ipaddress
import re

from starlette.types import Scope

from crypto_client.setting_values import Network

_SCOPE_KEY = "crypto_client.client_address"
_FORWARDED_FOR = re.compile(r'for="?\[?([^\]";,]+)', re.IGNORECASE)


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


def _forwarded_chain(scope: Scope) -> list[str]:
    forwarded: list[str] = []
    x_forwarded_for: list[str] = []
    for name, value in scope["headers"]:
        if name == b"forwarded":
            forwarded += _FORWARDED_FOR.findall(value.decode("latin-1"))
        elif name == b"x-forwarded-for":
            x_forwarded_for += [part.strip() for part in value.decode("latin-1").split(",")]
    # Forwarded (RFC 7239) is the standard one; X-Forwarded-For only when it is absent.
    return [entry for entry in (forwarded or x_forwarded_for) if entry]


def _strip_port(address: str) -> str:
    if address.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        return address.split(":", 1)[0]
    return address


def client_address(scope: Scope, trusted: tuple[Network, ...]) -> str:
    """The client's address for this request (worked out once per request)."""
    known = scope.get(_SCOPE_KEY)
    if isinstance(known, str):
        return known
    client = scope.get("client")
    address = str(client[0]) if client else "unknown"
    if trusted and _is_trusted(address, trusted):
        for hop in reversed(_forwarded_chain(scope)):
            address = _strip_port(hop)
            if not _is_trusted(address, trusted):
                break
    scope[_SCOPE_KEY] = address
    return address
