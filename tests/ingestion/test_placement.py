"""The placement rules on observations made up in the test (no source, no waiting for a real
slot): exact value, the clock rule, and a time inside the slot, or the reason there is none."""

from decimal import Decimal

import pytest
import structlog
from structlog.testing import capture_logs

from crypto_client.clients.source import Observation
from crypto_client.domain import NewPrice
from crypto_client.ingestion.clock import SourceClock
from crypto_client.ingestion.outcomes import TickerOutcome
from crypto_client.ingestion.placement import place

SLOT = 1_800_000_000  # a 10 s slot
INTERVAL = 10
LOG = structlog.get_logger("test")


def seen(
    at: float, server_time: float | None = None, price: str = "43521.37", *, rtt: float = 0.02
) -> Observation:
    """An answer received at `at` (sent `rtt` before), stamped `server_time` by the source."""
    server_us = None if server_time is None else round(server_time * 1_000_000)
    return Observation("btc_usd", Decimal(price), server_us, at - rtt, at)


def placed(observation: Observation, slot: int | None = SLOT) -> NewPrice | TickerOutcome:
    return place(observation, SourceClock(), slot, INTERVAL, LOG)


def test_an_answer_inside_its_slot_is_stored_at_the_sources_time() -> None:
    assert placed(seen(SLOT + 3.9, SLOT + 3.2)) == NewPrice("btc_usd", Decimal("43521.37"), SLOT + 3, SLOT)


def test_the_price_is_stored_exactly_in_plain_form() -> None:
    row = placed(seen(SLOT + 1, SLOT + 1, price="4.35213700E+4"))
    assert isinstance(row, NewPrice)
    assert str(row.price) == "43521.3700"


def test_a_source_time_across_the_slot_edge_gives_way_to_the_receive_time() -> None:
    # Deribit's clock says the previous slot; the answer arrived inside this one.
    row = placed(seen(SLOT + 0.4, SLOT - 0.3))
    assert isinstance(row, NewPrice)
    assert (row.ts, row.slot_ts) == (SLOT, SLOT)


def test_an_answer_after_its_slot_ended_is_late_and_keeps_its_price() -> None:
    with capture_logs() as logs:
        outcome = placed(seen(SLOT + INTERVAL + 0.001, SLOT + INTERVAL))
    assert isinstance(outcome, TickerOutcome)
    assert (outcome.status, outcome.reason, outcome.price) == ("failed", "late", Decimal("43521.37"))
    assert "after its slot" in (outcome.error or "")
    assert [entry["reason"] for entry in logs if entry["event"] == "ticker failed"] == ["late"]


def test_an_answer_before_its_slot_began_is_clock_skew() -> None:
    outcome = placed(seen(SLOT - 0.5, SLOT - 0.5))
    assert isinstance(outcome, TickerOutcome)
    assert outcome.reason == "clock_skew"


@pytest.mark.parametrize("server_time", [None, -1.0, 1e12, SLOT + 3600])
def test_an_unusable_source_time_is_replaced_by_the_local_one_with_a_warning(
    server_time: float | None,
) -> None:
    with capture_logs() as logs:
        row = placed(seen(SLOT + 5.7, server_time))
    assert isinstance(row, NewPrice)
    assert (row.ts, row.slot_ts) == (SLOT + 5, SLOT)
    warned = [
        entry for entry in logs if entry["event"] == "source time not used, storing the local receive time"
    ]
    assert len(warned) == 1
    assert warned[0]["local_time"] == SLOT + 5.7


@pytest.mark.parametrize("price", ["0", "-1", "NaN", "Infinity", "1E+20", "0.0000000000000000001"])
def test_a_price_this_service_does_not_store_fails_alone_as_invalid(price: str) -> None:
    outcome = placed(seen(SLOT + 1, SLOT + 1, price=price))
    assert isinstance(outcome, TickerOutcome)
    assert (outcome.status, outcome.reason) == ("failed", "invalid_value")


def test_an_envelope_time_of_hundreds_of_digits_fails_nothing_but_its_time() -> None:
    observation = Observation("btc_usd", Decimal("1.5"), 10**400, SLOT + 1.98, SLOT + 2)
    row = placed(observation)
    assert isinstance(row, NewPrice)
    assert (row.ts, row.slot_ts) == (SLOT + 2, SLOT)


def test_without_a_slot_the_row_has_none() -> None:
    row = placed(seen(SLOT + 1, SLOT + 1), slot=None)
    assert row == NewPrice("btc_usd", Decimal("43521.37"), SLOT + 1, None)
