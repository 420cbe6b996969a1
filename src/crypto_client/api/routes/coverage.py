"""Expected, stored and missing slots of a ticker, with the gaps and why."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.pagination import decode_cursor, next_page_link
from crypto_client.api.responses import INVALID, PAGED, UNAVAILABLE, UNKNOWN, JSONBytes, json_response
from crypto_client.api.schemas import CoverageOut, CoverageQuery
from crypto_client.coverage import measure

router = APIRouter()


@router.get(
    "/coverage",
    response_model=CoverageOut,
    responses={
        200: {**PAGED, "description": "Slot coverage; gaps oldest first, paged by Link."},
        **UNKNOWN,
        **INVALID,
        **UNAVAILABLE,
    },
    summary="Expected, stored and missing slots of a ticker, with the gaps and why",
)
async def coverage(
    request: Request,
    query: Annotated[CoverageQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
) -> JSONBytes:
    start_slot = decode_cursor(query.cursor) if query.cursor is not None else None
    async with database.reader() as reader:
        await require_known(reader, settings, query.ticker)
        result = await measure(
            reader,
            query.ticker,
            settings.ingest_interval_seconds,
            from_ts=query.from_ts,
            to_ts=query.to_ts,
            start_slot=start_slot,
            limit=query.limit,
        )
    body = {
        "ticker": result.ticker,
        "interval_seconds": result.interval_seconds,
        "from_ts": result.from_ts,
        "to_ts": result.to_ts,
        "expected_slots": result.expected_slots,
        "stored_slots": result.stored_slots,
        "missing_slots": result.missing_slots,
        "coverage": round(result.ratio, 6),
        "gaps": [
            {"from_ts": g.from_ts, "to_ts": g.to_ts, "slots": g.slots, "reason": g.reason, "detail": g.detail}
            for g in result.gaps
        ],
    }
    headers = (
        next_page_link(request, query.ticker, result.next_slot) if result.next_slot is not None else None
    )
    return json_response(body, headers=headers)
