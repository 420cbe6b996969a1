"""The values of settings that config validates at load and the layers above it use at run
time, parsed by one definition each: a setting that loads is one that works. Below every
layer, so that config imports nothing from the API or the database code."""

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from limits import RateLimitItem, parse_many
from sqlalchemy.engine import URL, make_url

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The async driver this service uses for each backend, whatever driver a URL names.
_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}


def async_url(url: str | URL) -> URL:
    """`url` with this service's async driver: `postgres://` and `postgresql+psycopg://` alike."""
    parsed = make_url(str(url).replace("postgres://", "postgresql://", 1)) if isinstance(url, str) else url
    backend = parsed.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported database {backend!r}: use PostgreSQL or SQLite")
    return parsed.set(drivername=_ASYNC_DRIVERS[backend])


def check_database_url(url: str) -> None:
    """Raise `ValueError` saying what is wrong when `url` is not a PostgreSQL or SQLite URL."""
    try:
        parsed = async_url(url)
    except ValueError:
        raise
    except Exception as exc:  # SQLAlchemy's parser raises several kinds
        raise ValueError(
            f"not a database URL ({exc}); e.g. postgresql://user:pass@host/db or sqlite:///path.db"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        # An in-memory database would be a different, empty one in every connection.
        raise ValueError("a SQLite URL needs a file path, e.g. sqlite:///crypto-client.db")


def check_broker_url(url: str) -> None:
    """Raise `ValueError` unless `url` is a Redis URL (the broker also holds slot claims and
    locks, so it must be Redis)."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise ValueError("must be a Redis URL, e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS)")
    try:
        parsed.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError("the port is not a number; e.g. redis://127.0.0.1:6379/0") from None


def parse_rate_limit(text: str) -> tuple[RateLimitItem, ...]:
    """`API_RATE_LIMIT` or a key's own (`100/second;10000/hour`) as limits; raises
    `ValueError` saying what is wrong."""
    try:
        items = tuple(parse_many(text))
    except ValueError:
        items = ()
    if not items:
        raise ValueError(f"{text!r} is not a rate limit: e.g. 100/second or 100/second;10000/hour")
    return items


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`FORWARDED_ALLOW_IPS`'s entries (addresses or CIDR networks; `*` is every address);
    raises `ValueError` naming a bad entry."""
    networks: list[Network] = []
    for entry in entries:
        if entry == "*":
            networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)
