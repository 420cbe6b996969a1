"""New prices as they are stored, as Server-Sent Events (`api.live` feeds them)."""

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from crypto_client import exact_json
from crypto_client.api import live
from crypto_client.api.deps import ReadDatabaseDep, SettingsDep
from crypto_client.api.errors import require_known
from crypto_client.api.limits import StreamSlot
from crypto_client.api.responses import INVALID, UNAVAILABLE, UNKNOWN
from crypto_client.api.schemas import ErrorOut, SnapshotQuery

# A comment line this often keeps proxies from closing a quiet stream.
STREAM_PING_SECONDS = 15
# A client whose connection accepts nothing for this long is gone.
STREAM_SEND_TIMEOUT_SECONDS = 30
# A `seq`: what an SSE `id` of this API can be; anything else is refused, not guessed at.
_LAST_EVENT_ID = re.compile(r"[0-9]{1,19}")
_MAX_SEQ = 2**63 - 1

# Its `ticker` may repeat (`?ticker=a&ticker=b`): `routes` includes it without the check.
router = APIRouter()


def _resume_point(last_event_id: str | None) -> int | None:
    """The `seq` a client resumes after, from its `Last-Event-ID` (empty: none, as an
    EventSource whose last event had no id would send it)."""
    if last_event_id is None or last_event_id == "":
        return None
    if _LAST_EVENT_ID.fullmatch(last_event_id) is None or int(last_event_id) > _MAX_SEQ:
        raise HTTPException(
            status_code=400,
            detail=f"Last-Event-ID {last_event_id[:40]!r} is not an id this stream sent: "
            f"send the `id` of the last event received (an integer from 0 to {_MAX_SEQ}), or none",
        )
    return int(last_event_id)


@router.get(
    "/prices/stream",
    dependencies=[StreamSlot],
    responses={
        200: {
            "description": "Server-Sent Events: one `price` event per stored row, its `id` the row's "
            "place in the order rows were stored. A `Last-Event-ID` beyond the newest row (the "
            "database was restored or replaced) first gets a `reset` event whose `id` is the newest "
            "row's: the stream continues from there.",
            "content": {"text/event-stream": {}},
        },
        400: {"model": ErrorOut, "description": "Last-Event-ID is not an id this stream sends."},
        **UNKNOWN,
        **INVALID,
        **UNAVAILABLE,
    },
    summary="New prices as they are stored, as Server-Sent Events; resumable with Last-Event-ID",
)
async def stream(
    query: Annotated[SnapshotQuery, Query()],
    database: ReadDatabaseDep,
    settings: SettingsDep,
    feed: live.PriceFeedDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="The last event's `id` a client received: resume after it.",
            # Documented, checked by `_resume_point`: a bad id is a 400, as in every HTTP API.
            json_schema_extra={"pattern": r"^[0-9]{0,19}$"},
        ),
    ] = None,
) -> EventSourceResponse:
    resume_after = _resume_point(last_event_id)
    tickers = query.ticker or list(settings.tickers)
    async with database.reader() as reader:
        for ticker in tickers:
            await require_known(reader, settings, ticker)
    await feed.wait_ready()

    async def price_events() -> AsyncIterator[ServerSentEvent]:
        async for item in live.events(feed, database, tickers, resume_after):
            if isinstance(item, live.ResumeReset):
                notice = {
                    "reason": "resume point beyond the newest stored row (the database was restored "
                    "or replaced): continuing after the newest row; reload anything kept from before",
                    "last_event_id": item.requested_seq,
                    "newest_seq": item.newest_seq,
                }
                yield ServerSentEvent(
                    exact_json.dumps(notice).decode(), event="reset", id=str(item.newest_seq)
                )
            else:
                yield ServerSentEvent(
                    exact_json.dumps(item.row._asdict()).decode(), event="price", id=str(item.seq)
                )

    return EventSourceResponse(
        price_events(), ping=STREAM_PING_SECONDS, send_timeout=STREAM_SEND_TIMEOUT_SECONDS
    )
