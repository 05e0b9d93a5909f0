"""Backfill from real inputs: incremental XML dumps over several days (tests/flows/dumpdays.py,
built from the recorded day's real bodies) and the recent-changes path with its ~30-day
limit, through the real steps and the real Prefect flow, the replay server on 127.0.0.1
(real `requests`) and a DuckDB file on disk.

A page's first revision in a dump file has its parent outside the file: it is diffed against
the parent fetched through the API client at that revision (before, it failed with "no API
client"). Every chunk has its own cursors, named with its bounds (before, every chunk of a
dump shared one cursor named after the file, so the second day's chunk skipped what the
first counted; the recent-changes path shared `wikidata:backfill-window`).
"""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from connectors.replay import ReplayServer
from flows.services import steps
from flows.services.settings import WIKIDATA_API, PipelineSettings
from kedit_core.errors import KeditError
from storage import ledger, wikidata_store
from storage.db import open_db
from tests.flows.conftest import flow_settings
from tests.flows.dumpdays import ACCEPTED_BY_DAY, DAYS, build_replay_folder, day, write_daily_dumps, write_one_dump

REPO = Path(__file__).resolve().parents[2]
API_PARENTS = {"619336121", "196015688", "2150000001", "241827923", "363579534"}


@pytest.fixture
def wiki(tmp_path):
    """The replay server over the recorded day plus the dumps' revisions (the object: its requests are read)."""
    server = ReplayServer(build_replay_folder(tmp_path / "wikidata"))
    server.start()
    yield server
    server.stop()


def _revids_asked(server: ReplayServer) -> set[str]:
    return {r for q in server.requests if "revids" in q["params"] for r in q["params"]["revids"].split("|")}


def _cursors(db, prefix: str) -> dict[str, str]:
    with db.connect(read_only=True) as con:
        rows = con.execute("SELECT name, value FROM flow_cursors WHERE name LIKE ? ORDER BY name",
                           [prefix + "%"]).fetchall()
    return dict(rows)


def _bounds(a: datetime, b: datetime) -> str:
    return f"{a:%Y-%m-%dT%H:%M:%SZ}..{b:%Y-%m-%dT%H:%M:%SZ}"


def test_each_day_of_one_dump_file_is_its_own_chunk_with_its_own_cursor(ledger_path, wiki, tmp_path):
    """One file holding three days, read a day at a time (the bug: the second day saw nothing)."""
    dump = write_one_dump(tmp_path / "dumps" / "wikidata-three-days.xml")
    cfg = PipelineSettings.from_env(**flow_settings(wiki.url, 3))
    got = [steps.backfill_chunk(cfg, day(n), day(n + 1), source="dump", dump_path=str(dump)) for n in (2, 3, 4)]

    assert [(c["revisions_seen"], c["revisions_new"], c["revisions_failed"]) for c in got] == [(2, 2, 0)] * 3
    assert [c["changes_accepted"] for c in got] == [ACCEPTED_BY_DAY[d] for d in DAYS]
    db = open_db(ledger_path)
    assert sorted(_cursors(db, "wikidata:dump:")) == [
        f"wikidata:dump:{dump.name}:{_bounds(day(n), day(n + 1))}" for n in (2, 3, 4)]
    status = {r["revid"]: (r["status"], r["reason"]) for r in wikidata_store.revision_rows(db)}
    assert status.pop(2150000306) == ("filtered", "bot edit (policy: allow_bots=False)")
    assert set(status.values()) == {("diffed", None)}
    # First revisions of their pages: diffed against the parent the API gave, at that revision.
    changes = {(c.revid, c.property, c.kind, c.old_revid) for c in wikidata_store.get_fact_changes(db)}
    assert (2150000301, "P6", "updated", 619336121) in changes
    assert (2150000304, "P54", "updated", 2150000001) in changes
    assert (2150000305, "P166", "added", 241827923) in changes
    # Karlsruhe's second revision (day 2) has its parent (day 1) in the same file: read from it.
    assert (2150000303, "P1082", "updated", 2150000301) in changes
    assert API_PARENTS - {"363579534"} <= _revids_asked(wiki)  # the bot edit is never diffed
    assert "2150000301" not in _revids_asked(wiki)

    again = steps.backfill_chunk(cfg, day(3), day(4), source="dump", dump_path=str(dump))
    assert (again["revisions_seen"], again["resumed_from"]) == (0, f"the end of {dump.name} (revision #6)")


def test_backfill_flow_replays_daily_dumps_over_three_days(prefect_api, ledger_path, wiki, tmp_path):
    from flows.prefect_flows import backfill

    dumps = write_daily_dumps(tmp_path / "dumps")
    settings = flow_settings(wiki.url, 4)
    out = backfill(start=day(2), end=day(5), chunk_hours=24, source="dump", dump_path=str(dumps), settings=settings)

    chunks = out["chunks"]
    assert [c["chunk"][:10] for c in chunks] == DAYS
    assert [c["changes_accepted"] for c in chunks] == [ACCEPTED_BY_DAY[d] for d in DAYS]
    assert all(c["revisions_failed"] == 0 and c["applied"] >= 1 for c in chunks), chunks
    # A chunk reads every file that can hold its revisions (a dump made on day D holds none after D).
    assert [len(c["dump_files"]) for c in chunks] == [3, 2, 1]
    db = open_db(ledger_path)
    revs = wikidata_store.revision_rows(db)
    assert len(revs) == 6 and not [r for r in revs if r["status"] == "failed"]
    assert not [r for r in revs if "no API client" in (r["reason"] or "")]
    # Karlsruhe's day-2 revision is the first of its page in its file: its parent (day 1's
    # revision, in the previous file) came from the API, like the other pages' parents.
    assert API_PARENTS - {"363579534"} | {"2150000301"} <= _revids_asked(wiki)
    cursors = _cursors(db, "wikidata:dump:")
    assert len(cursors) == 6
    for c in chunks:
        a = datetime.fromisoformat(c["chunk"])
        for name in c["dump_files"]:
            assert f"wikidata:dump:{name}:{_bounds(a, a + timedelta(days=1))}" in cursors
    applied = ledger.count_cases_by_status(db).get("applied")
    assert applied == sum(c["applied"] for c in chunks)
    versions = len(ledger.list_versions(db))

    rerun = backfill(start=day(2), end=day(5), chunk_hours=24, source="dump", dump_path=str(dumps), settings=settings)
    assert rerun["chunks"] == []  # every chunk finished: nothing re-read, nothing re-applied

    # An overlapping range is a new backfill. Its chunks with the bounds of chunks already
    # done find their files' cursors complete and read nothing; chunks with other bounds read
    # the files again and store nothing new.
    same = backfill(start=day(3), end=day(6), chunk_hours=24, source="dump", dump_path=str(dumps), settings=settings)
    assert [c["chunk"][:10] for c in same["chunks"]] == ["2024-05-03", "2024-05-04", "2024-05-05"]
    assert [(c["revisions_seen"], c["dump_files"]) for c in same["chunks"]] == [
        (0, [f.name for f in sorted(dumps.iterdir())][1:]), (0, [f.name for f in sorted(dumps.iterdir())][2:]), (0, [])]
    shifted = backfill(start=day(3) + timedelta(hours=12), end=day(5) + timedelta(hours=12), chunk_hours=24,
                       source="dump", dump_path=str(dumps), settings=settings)
    assert sum(c["revisions_seen"] for c in shifted["chunks"]) == 3  # 2150000304..306
    assert sum(c["revisions_already_stored"] for c in shifted["chunks"]) == 3
    assert sum(c["revisions_new"] + c["changes_new"] for c in shifted["chunks"]) == 0
    assert [(c["cases"], c["applied"]) for c in same["chunks"] + shifted["chunks"]] == [(0, 0)] * 5
    assert ledger.count_cases_by_status(db).get("applied") == applied
    assert len(ledger.list_versions(db)) == versions


def test_recent_changes_chunks_have_their_own_cursors(ledger_path, wiki):
    cfg = PipelineSettings.from_env(**flow_settings(wiki.url, 3))
    noon = day(1) + timedelta(hours=12)
    first = steps.backfill_chunk(cfg, day(1), noon)
    second = steps.backfill_chunk(cfg, noon, day(2))
    assert first["revisions_new"] > 0 and second["revisions_new"] > 0
    assert first["revisions_seen"] + second["revisions_seen"] == 12  # the recorded day's revisions
    db = open_db(ledger_path)
    assert sorted(_cursors(db, "wikidata:backfill-window:")) == [
        f"wikidata:backfill-window:{_bounds(day(1), noon)}", f"wikidata:backfill-window:{_bounds(noon, day(2))}"]


def test_recent_changes_older_than_wikidata_keeps_them_need_items_or_dumps(kedit_home, tmp_path):
    now = datetime(2024, 6, 15, tzinfo=timezone.utc)
    real = PipelineSettings.from_env(endpoint=WIKIDATA_API)
    with pytest.raises(KeditError) as err:
        steps.check_backfill(real, day(1), day(2), now=now)
    assert str(err.value) == ("Wikidata's recent changes reach back about 30 days (to 2024-05-16); a backfill "
                              "from 2024-05-01 needs --items Q42,... or --source dump --dump FILE")
    assert steps.check_backfill(real, now - timedelta(days=29), now, now=now) == []
    assert steps.check_backfill(real, day(1), day(2), items=["Q42"], now=now) == []
    # A replayed recording (or a mirror) keeps what it holds: a warning, and the backfill goes on.
    [warning] = steps.check_backfill(PipelineSettings.from_env(endpoint="http://127.0.0.1:9/w/api.php"),
                                     day(1), day(2), now=now)
    assert "needs --items" in warning and "going on" in warning
    with pytest.raises(KeditError, match="dump file .* does not exist"):
        steps.check_backfill(real, day(1), day(2), source="dump", dump_path=str(tmp_path / "missing.xml.bz2"))
    with pytest.raises(KeditError, match="holds no .xml"):
        steps.check_backfill(real, day(1), day(2), source="dump", dump_path=str(tmp_path))
    with pytest.raises(KeditError, match="unknown backfill source 'ftp'"):
        steps.check_backfill(real, day(1), day(2), source="ftp")

    # The command line refuses in one line, before any run starts or any request is sent.
    res = subprocess.run([sys.executable, "-m", "flows.cli", "backfill", "--start", "2024-05-01", "--end",
                          "2024-05-02"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: Wikidata's recent changes reach back about 30 days")
    assert res.stderr.strip().endswith("needs --items Q42,... or --source dump --dump FILE")
    assert len(res.stderr.strip().splitlines()) == 1 and not (kedit_home / "kedit.duckdb").exists()
