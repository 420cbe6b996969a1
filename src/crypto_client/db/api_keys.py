"""The `api_keys` table: what the `keys` commands write and the API reads."""

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.models import ApiKey


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    name: str
    key_hash: bytes
    created_at: int
    last_used_at: int | None
    rate_limit: str | None


_COLUMNS = (ApiKey.name, ApiKey.key_hash, ApiKey.created_at, ApiKey.last_used_at, ApiKey.rate_limit)


class KeyNameTakenError(Exception):
    """A key of that name exists already."""


async def create_key(
    connection: AsyncConnection, name: str, key_hash: bytes, rate_limit: str | None, now: int
) -> None:
    """Store a new key; raises `KeyNameTakenError` when the name is in use."""
    try:
        await connection.execute(
            insert(ApiKey).values(name=name, key_hash=key_hash, created_at=now, rate_limit=rate_limit)
        )
    except IntegrityError:
        raise KeyNameTakenError(name) from None


async def list_keys(connection: AsyncConnection) -> list[ApiKeyRow]:
    rows = await connection.execute(select(*_COLUMNS).order_by(ApiKey.name))
    return [ApiKeyRow(*row) for row in rows]


async def revoke_key(connection: AsyncConnection, name: str) -> bool:
    """Delete the key named `name`; False when there is none."""
    result = await connection.execute(delete(ApiKey).where(ApiKey.name == name))
    return bool(result.rowcount)


async def find_key(connection: AsyncConnection, key_hash: bytes) -> ApiKeyRow | None:
    """The key whose hash is `key_hash` (one unique-index seek), if any."""
    row = (await connection.execute(select(*_COLUMNS).where(ApiKey.key_hash == key_hash))).first()
    return None if row is None else ApiKeyRow(*row)


async def record_last_used(connection: AsyncConnection, used: Mapping[str, int]) -> None:
    """Move each named key's `last_used_at` forward to the time given (never back: API
    processes flush independently)."""
    for name, when in used.items():
        await connection.execute(
            update(ApiKey)
            .where(ApiKey.name == name)
            .values(
                last_used_at=case(
                    (ApiKey.last_used_at.is_(None), when),
                    else_=func.max(ApiKey.last_used_at, when)
                    if connection.dialect.name == "sqlite"
                    else func.greatest(ApiKey.last_used_at, when),
                )
            )
        )
