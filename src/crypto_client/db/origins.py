"""The origin of a database's prices: recorded at the first write, checked at every write.

A writer declares its origin on its engine (`declare_origin`); every write transaction of
that engine that stores prices or ledger entries checks it against `data_origin` inside the
transaction (`PriceWriter`), so a process that started before another origin wrote first is
refused all the same. Engines without a declared origin (tools, tests) are not checked.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import structlog
from sqlalchemy import inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from crypto_client.db.tables import data_origin
from crypto_client.origin import OriginSource

log = structlog.get_logger(__name__)

_OPTION = "crypto_client_writer_origin"
OVERRIDE_SETTING = "ALLOW_ORIGIN_CHANGE"


@dataclass(frozen=True, slots=True)
class WriterOrigin:
    source: OriginSource
    setting: str  # the setting that chose the source, for messages: DERIBIT_RPC_URL
    allow_change: bool = False


class DataOriginError(Exception):
    """The database holds prices of another origin than this writer's."""

    def __init__(self, stored: str, writer: str, setting: str, database: str = "the database") -> None:
        super().__init__(
            f"{database} holds prices from {stored!r}, this writer's origin is {writer!r} "
            f"({setting}); set {OVERRIDE_SETTING}=true to write into it anyway"
        )
        self.stored = stored
        self.writer = writer


class StoredOrigins(NamedTuple):
    first: str | None  # the origin of the first write; None: nothing written yet
    by_override: list[str]  # other origins that wrote under ALLOW_ORIGIN_CHANGE, oldest first


async def stored_origins(engine: AsyncEngine) -> StoredOrigins:
    """The database's origins; none before revision 0008 (`serve` migrates after its checks)."""
    async with engine.connect() as connection:
        if not await connection.run_sync(lambda sync: inspect(sync).has_table(data_origin.name)):
            return StoredOrigins(None, [])
        return await OriginRegistry(connection).stored()


def declare_origin(engine: AsyncEngine, origin: WriterOrigin) -> AsyncEngine:
    """`engine` (sharing its pool) whose write transactions check `origin`."""
    return engine.execution_options(**{_OPTION: origin})


class OriginRegistry:
    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    _STORED = select(data_origin.c.origin, data_origin.c.by_override).order_by(
        data_origin.c.first_write_ts, data_origin.c.origin
    )

    async def stored(self) -> StoredOrigins:
        rows = (await self._connection.execute(self._STORED)).all()
        first = next((origin for origin, by_override in rows if not by_override), None)
        return StoredOrigins(first, [origin for origin, by_override in rows if by_override])

    async def check_declared(self, *, claim: bool) -> None:
        """Raise `DataOriginError` unless this connection's declared writer origin may
        write here; `claim`: record it when the database has none yet (a write of prices
        whose source has answered)."""
        sync = self._connection.sync_connection
        declared = None if sync is None else sync.get_execution_options().get(_OPTION)
        if not isinstance(declared, WriterOrigin):
            return
        writer, confirmed = declared.source.origin, declared.source.answered
        stored = await self.stored()
        if stored.first is None and claim and confirmed:
            await self._insert(writer, by_override=False)
            stored = await self.stored()
        if stored.first is None or stored.first == writer:
            return
        if not declared.allow_change:
            raise DataOriginError(stored.first, writer, declared.setting)
        if confirmed and writer not in stored.by_override:
            await self._insert(writer, by_override=True)
            log.warning(
                f"writing prices of another origin: {OVERRIDE_SETTING} is set",
                database_origin=stored.first,
                writer_origin=writer,
            )

    _INSERT: ClassVar[Mapping[str, Executable]] = {
        "postgresql": postgresql.insert(data_origin).on_conflict_do_nothing(),
        "sqlite": sqlite.insert(data_origin).on_conflict_do_nothing(),
    }

    async def _insert(self, origin: str, *, by_override: bool) -> None:
        # Racing writers: the primary key and the one-first-origin index let one row win.
        await self._connection.execute(
            self._INSERT[self._connection.dialect.name],
            {"origin": origin, "first_write_ts": int(time.time()), "by_override": by_override},
        )
