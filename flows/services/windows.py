"""Which Wikidata time windows a nightly run ingests: from a cursor in the ledger, not from
the wall clock (pure functions; the flow reads and moves the cursor).

Each run continues where the last one ended and stops at its target end (now minus the
settle time, so reverts inside the settle window have been seen): a run that starts late
leaves no gap, a missed night is caught up by the next run, in order, one chunk
(`window_hours`, a day by default) at a time, and two runs never read the same window. The
first run ever reads one chunk back from its target end. One run's work is bounded: at
most `max_span_hours` of windows, and no new chunk once `max_changes` fact changes were
accepted in this run (a chunk is never cut in two); what is left waits for the next run.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

CURSOR = "nightly:window_end"  # the end of the last window whose ingest and cases are done


@dataclass(frozen=True)
class WindowPlan:
    chunks: list[tuple[datetime, datetime]]  # in order, contiguous, half-open [start, end)
    target_end: datetime  # where the run would end with no bound on its work
    resumed: bool  # the first chunk starts at the stored cursor (else: the first run ever)

    @property
    def end(self) -> datetime | None:
        return self.chunks[-1][1] if self.chunks else None

    def left_after(self, done_until: datetime | None) -> timedelta:
        """What remains for the next run when this run got as far as `done_until`."""
        start = done_until or (self.chunks[0][0] if self.chunks else self.target_end)
        return max(self.target_end - start, timedelta(0))


def utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def target_end(now: datetime, settle_hours: float, window_end: datetime | None = None) -> datetime:
    """The end this run aims for: an explicit `window_end` (replays, tests), else now minus settle."""
    return utc(window_end) if window_end is not None else utc(now) - timedelta(hours=settle_hours)


def plan_windows(cursor: datetime | None, end: datetime, chunk_hours: float = 24.0,
                 max_span_hours: float | None = None) -> WindowPlan:
    """Chunks from `cursor` (or one chunk before `end` on the first run) up to `end`, at most
    `max_span_hours` of them. Nothing when the cursor is already at or past `end`."""
    if chunk_hours <= 0:
        raise ValueError(f"window_hours must be > 0, got {chunk_hours}")
    if max_span_hours is not None and max_span_hours <= 0:
        raise ValueError(f"max_span_hours must be > 0, got {max_span_hours}")
    end = utc(end)
    step = timedelta(hours=chunk_hours)
    start = utc(cursor) if cursor is not None else end - step
    stop = end if max_span_hours is None else min(end, start + timedelta(hours=max_span_hours))
    chunks, t = [], start
    while t < stop:
        chunks.append((t, min(t + step, stop)))
        t += step
    return WindowPlan(chunks, end, cursor is not None)


def over_change_budget(accepted_so_far: int, max_changes: int | None) -> bool:
    """Whether a run that accepted this many fact changes starts no further chunk."""
    return bool(max_changes) and accepted_so_far >= int(max_changes)  # type: ignore[arg-type]
