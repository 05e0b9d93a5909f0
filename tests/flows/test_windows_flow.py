"""The nightly flow's windows over a replayed sequence of "nights" (Prefect, the recorded
Wikidata day replayed from 127.0.0.1 through `requests`, a tiny model, a DuckDB file): every
night continues where the last ended, a missed night and a late start are caught up in
order, one run's work is bounded (a change budget, a maximum span) with the rest left for
the next run, and the whole sequence reads exactly what one read of the day reads: no gap,
no overlap. The recorded data holds one day, so a "night" here is 6 hours (window_hours=6)."""
from __future__ import annotations

from datetime import datetime, timezone


import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from flows.services.ingest import ingest_window
from connectors.wikidata import WikidataClient
from flows.services.settings import PipelineSettings
from flows.services.steps import filter_config
from storage import ledger, wikidata_store
from storage.db import open_db
from tests.flows.conftest import flow_settings


def at(day: int, hour: int) -> datetime:
    return datetime(2024, 5, day, hour, tzinfo=timezone.utc)


def _settings(url: str, **bounds) -> dict:
    return flow_settings(url, batch_size=4, **{"max_span_hours": None, **bounds})


def _night(url: str, end: datetime, **bounds) -> dict:
    from flows.prefect_flows import nightly_update

    return nightly_update(window_end=end, window_hours=6, settings=_settings(url, **bounds))


def _read(db) -> tuple[list, list]:
    revs = sorted((r["revid"], r["status"], r["reason"]) for r in wikidata_store.revision_rows(db))
    changes = sorted(r["change_id"] for r in wikidata_store.fact_change_rows(db))
    return revs, changes


def test_nights_continue_from_the_cursor_catch_up_in_order_and_stay_within_their_bounds(
        prefect_api, ledger_path, replay, kedit_home):
    nights = [
        _night(replay, at(1, 6)),  # the first run ever: one window back, [00:00, 06:00)
        # the 12:00 night is missed; the next starts late (20:00) and stops at its change budget
        _night(replay, at(1, 20), max_changes_per_run=2),
        _night(replay, at(2, 0), max_span_hours=6),  # one 6 h window of the backlog at most
        _night(replay, at(2, 6)),  # the rest, in order, and the new night
        _night(replay, at(2, 6)),  # nothing new
    ]
    windows = [[w for w in n["windows"]] for n in nights]
    iso = lambda t: t.isoformat()  # noqa: E731
    assert windows == [
        [[iso(at(1, 0)), iso(at(1, 6))]],
        [[iso(at(1, 6)), iso(at(1, 12))]],  # 5 changes accepted by 12:00: the budget of 2 is spent
        [[iso(at(1, 12)), iso(at(1, 18))]],
        [[iso(at(1, 18)), iso(at(2, 0))], [iso(at(2, 0)), iso(at(2, 6))]],
        [],
    ]
    assert [n["backlog_hours"] for n in nights] == [0, 8, 6, 0, 0]
    flat = [w for ws in windows for w in ws]
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:]))  # contiguous: no gap, no overlap
    # Every revision of the day read exactly once, none twice.
    assert sum(n["ingest"]["revisions_seen"] for n in nights) == 12
    assert sum(n["ingest"]["revisions_new"] for n in nights) == 12
    assert sum(n["ingest"]["revisions_already_stored"] for n in nights) == 0
    db = open_db(ledger_path)
    assert ledger.get_cursor(db, "nightly:window_end") == iso(at(2, 6))
    planned = [r["config"] for r in ledger.list_runs(db, kind="nightly")]
    assert iso(at(1, 18)) in planned[1]  # the late night planned the whole way to 20:00 ...
    assert nights[1]["window"] == [iso(at(1, 6)), iso(at(1, 12))]  # ... and did what its budget allowed

    # The same as one read of the whole day, in a ledger of its own.
    one_go = open_db(kedit_home / "one-go.duckdb")
    client = WikidataClient(endpoint=replay, rate_limit_per_s=None)
    try:
        ingest_window(client, one_go, at(1, 0), at(2, 0), filter_config(PipelineSettings.from_env(**_settings(replay))))
    finally:
        client.close()
    assert _read(db) == _read(one_go)
    # Applied once each, nothing left pending; the last night applied nothing.
    applied = sum(n["edits"].get("applied_cases", 0) for n in nights)
    assert ledger.count_cases_by_status(db) == {"applied": applied} and applied >= 5
    assert nights[-1]["edits"].get("applied_cases", 0) == 0
