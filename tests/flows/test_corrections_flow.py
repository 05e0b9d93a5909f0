"""Corrections reach the model, through the real flows (Prefect, a replayed Wikidata, a tiny
model, a DuckDB file): a vandal edit applied one night and reverted after the settle window
is undone by an edit back to the restored value; a backfill of an older day never writes
its older value over a newer applied one; two changes of one fact in one run apply only
the latest. Every such decision is in the ledger with its reason.

The recorded day (data/wikidata_day) has no late revert, so this test extends a copy of it
with two constructed revisions in the recording's own shapes, on Karlsruhe (Q1040), whose
head of government (P6, single-valued) the recorded day changes to Lena Hartmann at 09:02:
- 2150000201, 2024-05-02 08:00, registered user "Spassvogel": the preferred P6 value
  replaced by a placeholder item "Homer Simpson" (Q999000105), no revert tag yet (what the
  API answers before the revert);
- 2150000202, 2024-05-04 10:00 (50 h later, past the 48 h settle window), "Patroller":
  its undo (`mw-undo`, `/* undo:0||2150000201|Spassvogel */`), restoring revision 2150000109.
"""
from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from connectors.replay import ReplayServer
from flows.services import steps
from storage import correction_store, ledger, wikidata_store
from storage.db import open_db
from tests.conftest import WIKIDATA_DAY
from tests.flows.conftest import flow_settings

VANDAL, REVERT = 2150000201, 2150000202
MAYOR_UPDATE = 2150000103  # the recorded day's Mentrup -> Hartmann, 2024-05-01 09:02:40


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2024, 5, day, hour, tzinfo=timezone.utc)


def _rev(folder: Path, revid: int, parent: int, ts: str, user: str, tags: list[str], comment: str,
         entity: dict) -> dict:
    rev = {"revid": revid, "parentid": parent, "timestamp": ts, "user": user, "comment": comment, "tags": tags}
    rec = {"title": "Q1040", "pageid": 1374, "revision": rev, "entity": entity}
    (folder / "revisions" / f"{revid}.json").write_text(json.dumps(rec), encoding="utf-8")
    return {"type": "edit", "ns": 0, "title": "Q1040", "pageid": 1374, "revid": revid, "old_revid": parent,
            "rcid": 2300000100 + revid % 100, "user": user, "bot": False, "new": False, "minor": False,
            "timestamp": ts, "comment": comment, "tags": tags}


def build_late_revert_days(folder: Path) -> Path:
    shutil.copytree(WIKIDATA_DAY, folder)
    before = json.loads((folder / "revisions" / "2150000109.json").read_text(encoding="utf-8"))["entity"]
    vandal = copy.deepcopy(before)
    for s in vandal["claims"]["P6"]:
        if s["rank"] == "preferred":
            s["mainsnak"]["datavalue"]["value"] = {"entity-type": "item", "numeric-id": 999000105, "id": "Q999000105"}
    rows = [
        _rev(folder, VANDAL, 2150000109, "2024-05-02T08:00:00Z", "Spassvogel", [],
             "/* wbsetclaim-update:2||1 */ [[Property:P6]]: [[Q999000105]]", vandal),
        _rev(folder, REVERT, VANDAL, "2024-05-04T10:00:00Z", "Patroller", ["mw-undo"],
             f"/* undo:0||{VANDAL}|Spassvogel */", before),
    ]
    (folder / "recentchanges-4.json").write_text(json.dumps({"batchcomplete": True, "query": {"recentchanges": rows}}),
                                                 encoding="utf-8")
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    labels["entities"]["Q999000105"] = {"id": "Q999000105", "type": "item", "aliases": {}, "descriptions": {},
                                        "labels": {"en": {"language": "en", "value": "Homer Simpson"}}}
    (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    users = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    users["Spassvogel"] = {"editcount": 40, "registration": "2022-02-02T00:00:00Z"}
    (folder / "users.json").write_text(json.dumps(users), encoding="utf-8")
    return folder


@pytest.fixture
def replay(tmp_path):
    with ReplayServer(build_late_revert_days(tmp_path / "wikidata_days")) as url:
        yield url


def _settings(url: str) -> dict:
    return flow_settings(url, batch_size=4, max_span_hours=None)


def _night(url: str, end: datetime, hours: float = 24) -> dict:
    from flows.prefect_flows import nightly_update

    return nightly_update(window_end=end, window_hours=hours, settings=_settings(url))


def _mayor_cases(db) -> dict[int, dict]:
    """Karlsruhe's P6 cases by the revision they came from: status, reason, answers."""
    out = {}
    for row in ledger.case_rows(db):
        case = next(c for c in ledger.get_cases(db) if c.case_id == row["case_id"])
        if case.meta.get("subject_id") == "Q1040" and case.relation == "P6":
            out[case.meta["revid"]] = {**row, "target_new": case.target_new, "target_old": case.target_old}
    return out


def _version_of(db, batch_id: str) -> int:
    return next(b["version_id"] for b in ledger.list_batches(db) if b["batch_id"] == batch_id)


def test_a_vandal_edit_applied_then_reverted_after_the_settle_window_is_undone(prefect_api, ledger_path, replay):
    night1 = _night(replay, at(3))  # first run: [05-02, 05-03), the vandal edit survived 48 h
    db = open_db(ledger_path)
    cases = _mayor_cases(db)
    assert cases[VANDAL]["status"] == "applied" and cases[VANDAL]["target_new"] == "Homer Simpson"
    vandal_version = _version_of(db, cases[VANDAL]["batch_id"])
    night2 = _night(replay, at(4))  # [05-03, 05-04): nothing of Karlsruhe
    assert night2["edits"]["applied_cases"] == 0
    night3 = _night(replay, at(5))  # [05-04, 05-05): the undo, 50 h after the vandal edit

    revert = _mayor_cases(db)[REVERT]
    assert revert["status"] == "applied"
    assert (revert["target_new"], revert["target_old"]) == ("Lena Hartmann", "Homer Simpson")
    assert _version_of(db, revert["batch_id"]) > vandal_version
    why = f"reverts revision {VANDAL} applied in version {vandal_version}: 'Homer Simpson' back to 'Lena Hartmann'"
    assert [(d["status"], d["reason"]) for d in correction_store.decision_rows(db, revert["case_id"])] == [
        ("pending", why)]
    assert night3["edits"]["corrections"] == {"superseded": 0, "reverts_applied": 1, "reverts_filtered": 0}
    assert night3["edits"]["applied_cases"] == 1
    # The revert revision was diffed (not filtered as "a revert"), and the next night applies nothing.
    status = {r["revid"]: r["status"] for r in wikidata_store.revision_rows(db)}
    assert status[REVERT] == "diffed"
    assert _night(replay, at(5))["edits"]["applied_cases"] == 0
    assert night1["edits"]["applied_cases"] >= 1


def test_a_backfill_of_an_older_day_never_overwrites_a_newer_applied_value(prefect_api, ledger_path, replay):
    from flows.prefect_flows import backfill

    _night(replay, at(3))  # applies 2024-05-02's P6 value (revision 2150000201)
    db = open_db(ledger_path)
    newer = _mayor_cases(db)[VANDAL]
    assert newer["status"] == "applied"
    out = backfill(start=at(1), end=at(2), settings=_settings(replay))  # 2024-05-01: Mentrup -> Hartmann

    older = _mayor_cases(db)[MAYOR_UPDATE]
    assert older["status"] == "superseded"
    assert older["reason"] == f"older than applied revision {VANDAL} of 2024-05-02T08:00:00Z"
    assert [d["reason"] for d in correction_store.decision_rows(db, older["case_id"])] == [older["reason"]]
    assert _mayor_cases(db)[VANDAL]["status"] == "applied"  # still the model's value
    # The day's other facts are not older than anything applied: they are.
    assert out["chunks"][0]["applied"] >= 1
    applied_subjects = {c.meta["subject_id"] for c in ledger.get_cases(db, status="applied")}
    assert {"Q42", "Q1040"} <= applied_subjects


def test_two_changes_of_one_fact_in_one_run_apply_only_the_latest(prefect_api, ledger_path, replay, monkeypatch):
    _night(replay, at(1))  # the first run reads [04-30, 05-01): nothing; the cursor is set
    night = _night(replay, at(3))  # two windows, [05-01, 05-02) and [05-02, 05-03), one edit step
    assert len(night["windows"]) == 2
    db = open_db(ledger_path)
    cases = _mayor_cases(db)
    assert cases[VANDAL]["status"] == "applied"
    assert cases[MAYOR_UPDATE]["status"] == "superseded"
    assert cases[MAYOR_UPDATE]["reason"] == (
        f"superseded by revision {VANDAL} of 2024-05-02T08:00:00Z, a later change of the same fact")
    assert night["edits"]["corrections"]["superseded"] == 1

    # Inside one window the case builder keeps only the latest change of the fact.
    wide = open_db(ledger_path.with_name("one-window.duckdb"))
    monkeypatch.setenv("KEDIT_DB", str(wide.path))
    steps.forget_live_models()
    _night(replay, at(3), hours=48)  # one window [05-01, 05-03)
    changes = {r["revid"]: r for r in wikidata_store.fact_change_rows(wide) if r["subject"] == "Q1040"
               and r["property"] == "P6"}
    assert changes[MAYOR_UPDATE]["status"] == "filtered" and changes[MAYOR_UPDATE]["reason"].startswith("superseded")
    assert [c["status"] for c in _mayor_cases(wide).values()] == ["applied"]
    assert list(_mayor_cases(wide)) == [VANDAL]
