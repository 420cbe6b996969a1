"""Which clock a stored row's `ts` comes from.

The rule: `ts` is the source's own time (Deribit's `usOut`) when it agrees with the local
observation window (request sent .. answer received), shifted by the offset between the two
clocks that this process measures from recent answers; otherwise it is the local receive time,
and a warning carries both values. An offset is only believed up to `MAX_CLOCK_OFFSET_SECONDS`,
so a source clock that is hours off, stuck or stepping back changes nothing but the warnings.
"""

import statistics
from collections import deque
from dataclasses import dataclass

import structlog

from crypto_client.clients.source import Observation
from crypto_client.domain import MAX_TS

log = structlog.get_logger(__name__)

# Beyond this, the source's clock is wrong, not merely offset: fall back to the local clock.
MAX_CLOCK_OFFSET_SECONDS = 10.0
# Network and rounding jitter allowed around the observation window.
CLOCK_TOLERANCE_SECONDS = 1.0
# The offset is the median of this many recent answers, so one odd answer cannot move it, and
# it is applied only once that many agree within the tolerance: a clock that is stuck or
# stepping shows as spread, and then no offset is believed.
_OFFSET_SAMPLES = 15
# A change of the measured offset larger than this is logged.
_OFFSET_CHANGE_LOGGED_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Timing:
    ts: float  # UNIX seconds
    clock: str  # "source" or "local"
    problem: str | None = None  # why the source's time was not used


class SourceClock:
    """The measured offset of one source's clock from ours, and the choice of `ts`."""

    def __init__(self) -> None:
        self._offsets: deque[float] = deque(maxlen=_OFFSET_SAMPLES)
        self._logged_offset = 0.0

    @property
    def offset_seconds(self) -> float:
        settled = (
            len(self._offsets) == self._offsets.maxlen
            and max(self._offsets) - min(self._offsets) <= CLOCK_TOLERANCE_SECONDS
        )
        return statistics.median(self._offsets) if settled else 0.0

    def time_of(self, observation: Observation) -> Timing:
        local = observation.received_at
        server_us = observation.server_time_us
        if server_us is None:
            return Timing(local, "local", "usOut missing or not an integer")
        # Compared as integers first: an integer of hundreds of digits is no float.
        if not 0 <= server_us <= MAX_TS * 1_000_000:
            shown = str(server_us) if abs(server_us) < 10**24 else f"of {server_us.bit_length()} bits"
            return Timing(local, "local", f"usOut {shown} is not a time in microseconds")
        server = server_us / 1_000_000
        sample = server - (observation.sent_at + observation.received_at) / 2
        if abs(sample) <= MAX_CLOCK_OFFSET_SECONDS:
            self._offsets.append(sample)
            self._log_offset_change()
        offset = self.offset_seconds
        earliest = observation.sent_at + offset - CLOCK_TOLERANCE_SECONDS
        latest = observation.received_at + offset + CLOCK_TOLERANCE_SECONDS
        if earliest <= server <= latest:
            return Timing(server, "source")
        return Timing(
            local,
            "local",
            f"usOut {server:.6f} is outside the observation window "
            f"{observation.sent_at:.6f}..{observation.received_at:.6f} (clock offset {offset:+.3f} s)",
        )

    def _log_offset_change(self) -> None:
        offset = self.offset_seconds
        if abs(offset - self._logged_offset) > _OFFSET_CHANGE_LOGGED_SECONDS:
            log.warning(
                "source clock offset changed",
                offset_seconds=round(offset, 3),
                previous_offset_seconds=round(self._logged_offset, 3),
            )
            self._logged_offset = offset
