"""`GET /settlements`: Deribit's daily delivery prices of a ticker, oldest first, paged."""

from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from crypto_client import exact_json
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.pagination import decode_cursor, next_page_link
from crypto_client.api.responses import INVALID, PAGED, UNAVAILABLE, UNKNOWN, JSONBytes
from crypto_client.api.schemas import SettlementOut, SettlementQuery
from crypto_client.db.settlements import Settlements
from crypto_client.domain import DAY_SECONDS

router = APIRouter()

_FIRST_DAY, _LAST_DAY = date(1970, 1, 1), date(9999, 12, 31)


def _day_ts(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


@router.get(
    "/settlements",
    response_model=list[SettlementOut],
    responses={200: PAGED, **UNKNOWN, **INVALID, **UNAVAILABLE},
    summary="Daily settlement (delivery) prices of a ticker, oldest first, paged",
)
async def list_settlements(
    request: Request,
    query: Annotated[SettlementQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
) -> JSONBytes:
    lower = query.from_ or _FIRST_DAY
    if query.cursor is not None:
        # The cursor is the next page's first day, as UNIX seconds of its start.
        lower = max(
            lower,
            datetime.fromtimestamp(decode_cursor(query.cursor) // DAY_SECONDS * DAY_SECONDS, UTC).date(),
        )
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)
        page = await Settlements(reader.connection).page(
            query.ticker, lower, query.to or _LAST_DAY, limit=query.limit
        )
    body = [{"date": row.date.isoformat(), "delivery_price": row.delivery_price} for row in page.rows]
    headers = (
        None if page.next_date is None else next_page_link(request, query.ticker, _day_ts(page.next_date))
    )
    return JSONBytes(exact_json.dumps(body), headers=headers)
