"""Nightly windows from the ledger's cursor (flows/services/windows.py): the arithmetic as pure
functions, and the cursor in a real DuckDB file through the steps the flow calls."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from flows.services.windows import over_change_budget, plan_windows, target_end

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def test_the_first_run_ever_reads_one_window_back_from_now_minus_settle():
    end = target_end(day(3) + timedelta(hours=2), settle_hours=48)
    assert end == day(1) + timedelta(hours=2)
    plan = plan_windows(None, end, 24)
    assert plan.chunks == [(day(0) + timedelta(hours=2), day(1) + timedelta(hours=2))] and not plan.resumed


def test_a_late_start_extends_the_window_and_the_next_night_continues_without_gap_or_overlap():
    on_time = plan_windows(day(1), day(2), 24)
    assert on_time.chunks == [(day(1), day(2))] and on_time.resumed
    late = plan_windows(day(2), day(3) + timedelta(hours=5), 24)  # started 5 h late
    assert late.chunks == [(day(2), day(3)), (day(3), day(3) + timedelta(hours=5))]
    nxt = plan_windows(late.end, day(4), 24)  # next night on time
    assert nxt.chunks == [(day(3) + timedelta(hours=5), day(4))]


def test_missed_nights_are_caught_up_in_order_one_window_at_a_time_within_the_span_bound():
    plan = plan_windows(day(1), day(6), 24, max_span_hours=72)  # four nights missed
    assert plan.chunks == [(day(1), day(2)), (day(2), day(3)), (day(3), day(4))]
    assert plan.left_after(plan.end) == timedelta(days=2)
    rest = plan_windows(plan.end, day(6), 24, max_span_hours=72)
    assert rest.chunks == [(day(4), day(5)), (day(5), day(6))] and rest.left_after(rest.end) == timedelta(0)
    # A budget stop after the first chunk leaves the rest from there.
    assert plan.left_after(day(2)) == timedelta(days=4)


def test_nothing_to_do_when_the_cursor_is_at_or_past_the_end():
    assert plan_windows(day(2), day(2), 24).chunks == []
    assert plan_windows(day(3), day(2), 24).chunks == []  # an explicit end before the cursor
    assert plan_windows(day(3), day(2), 24).left_after(None) == timedelta(0)


def test_bad_bounds_are_refused_and_the_change_budget():
    with pytest.raises(ValueError, match="window_hours"):
        plan_windows(None, day(1), 0)
    with pytest.raises(ValueError, match="max_span_hours"):
        plan_windows(None, day(1), 24, max_span_hours=-1)
    assert not over_change_budget(10**6, None) and not over_change_budget(5, 6)
    assert over_change_budget(6, 6) and over_change_budget(7, 6)


def test_the_cursor_lives_in_the_ledger_and_never_moves_back(kedit_home, monkeypatch):
    from flows.services import steps
    from flows.services.settings import PipelineSettings
    from storage import ledger
    from storage.db import open_db

    monkeypatch.setenv("KEDIT_DB", str(kedit_home / "w.duckdb"))
    cfg = PipelineSettings(settle_hours=48, max_span_hours=None)
    now = day(5)
    first = steps.window_plan(cfg, None, 24, now=now)
    assert first.chunks == [(day(2), day(3))]
    steps.advance_window_cursor(day(3))
    assert steps.window_plan(cfg, None, 24, now=now).chunks == []  # caught up until tomorrow
    assert steps.window_plan(cfg, None, 24, now=day(7)).chunks == [(day(3), day(4)), (day(4), day(5))]
    steps.advance_window_cursor(day(1))  # an older end (a replay of an old day) does not rewind it
    assert ledger.get_cursor(open_db(), "nightly:window_end") == day(3).isoformat()
