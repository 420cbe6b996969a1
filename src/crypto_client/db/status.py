"""What the health endpoints ask the database: does it answer, is it a lagging replica, and
where its prices come from."""

from typing import NamedTuple

from sqlalchemy import literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from crypto_client.db.origins import OriginRegistry, StoredOrigins
from crypto_client.db.tables import price_ticks


class Replication(NamedTuple):
    streaming: bool
    lag_seconds: float


class StatusReads:
    """Part of `PriceReader`."""

    _connection: AsyncConnection

    _PING = select(literal(1)).select_from(price_ticks).limit(1)

    async def ping(self) -> None:
        """Fails unless this connection can read `price_ticks` (reachable, migrated, allowed)."""
        await self._connection.execute(self._PING)

    _REPLICATION = text(
        "SELECT pg_is_in_recovery() AS replica,"
        " (SELECT status FROM pg_stat_wal_receiver) AS receiver,"
        " pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() AS caught_up,"
        " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) AS since_replay"
    )

    async def replication(self) -> Replication | None:
        """None on a primary (and on SQLite); on a streaming replica, whether it streams and
        how far its replay is behind the primary."""
        if self._connection.dialect.name != "postgresql":
            return None
        row = (await self._connection.execute(self._REPLICATION)).one()
        if not row.replica:
            return None
        # A replica that has replayed all it received is current, however long ago the
        # primary last wrote; only then is "time since the last replayed write" no lag.
        lag = 0.0 if row.caught_up else float(row.since_replay or 0.0)
        return Replication(streaming=row.receiver == "streaming", lag_seconds=lag)

    async def data_origins(self) -> StoredOrigins:
        """Where this database's prices come from (see `db.origins`)."""
        return await OriginRegistry(self._connection).stored()
