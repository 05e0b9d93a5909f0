"""Ingestion into a DuckDB file on disk from the recorded day served on 127.0.0.1:
statuses and reasons, idempotent re-runs, resume after a crash, backfill and dumps."""
from __future__ import annotations

import bz2
import json
from xml.sax.saxutils import escape

import pytest

from flows.services.ingest import backfill_items, ingest_dump, ingest_window
from flows.services.labels import CachedLabelLookup
from connectors.replay import ReplayServer
from connectors.wikidata import WikidataClient
from kedit_core.filters import FilterConfig
from storage import ledger, wikidata_store
from storage.db import open_db
from tests.conftest import DAY_END as END
from tests.conftest import DAY_START as START
from tests.conftest import WIKIDATA_DAY as DAY


def client(srv: ReplayServer) -> WikidataClient:
    return WikidataClient(endpoint=srv.url, rate_limit_per_s=None, sleep=lambda s: None)


def snapshot(db) -> tuple[list, list]:
    revs = [(r["revid"], r["status"], r["reason"]) for r in wikidata_store.revision_rows(db)]
    changes = sorted((r["change_id"], r["status"], r["reason"]) for r in wikidata_store.fact_change_rows(db))
    return revs, changes


def test_window_is_diffed_filtered_and_stored_with_reasons(server, kedit_home):
    db = open_db(kedit_home / "wd.duckdb")
    rep = ingest_window(client(server), db, START, END)
    assert (rep.revisions_seen, rep.revisions_new, rep.revisions_filtered, rep.revisions_failed) == (12, 12, 4, 1)
    assert (rep.changes_accepted, rep.changes_quarantined) == (10, 1)
    status = {r["revid"]: (r["status"], r["reason"]) for r in wikidata_store.revision_rows(db)}
    assert status[2150000106] == ("filtered", "reverted later (mw-reverted tag)")
    assert status[2150000107][1].startswith("a revert")
    assert status[2150000108] == ("filtered", "bot edit (policy: allow_bots=False)")
    assert status[2150000110] == ("filtered", "descriptions-only edit (no statement changed)")
    assert status[2150000112][0] == "failed" and "content hidden" in status[2150000112][1]
    accepted = {(c.subject, c.property, c.kind) for c in wikidata_store.get_fact_changes(db)}
    assert ("Q1040", "P6", "updated") in accepted and ("Q131261", "P54", "updated") in accepted
    assert ("Q1040", "P1082", "updated") in accepted and ("Q328212", "P166", "added") in accepted
    assert ("Q42", "P800", "added") in accepted
    [q] = wikidata_store.fact_change_rows(db, status="quarantined")
    assert q["subject"] == "Q328212" and "profanity" in q["reason"]
    mayor = [c for c in wikidata_store.get_fact_changes(db) if c.property == "P6"][0]
    assert mayor.new_value == {"type": "wikibase-item", "id": "Q999000101"}
    assert mayor.qualifiers["replaced_end"]["time"] == "+2024-05-01T00:00:00Z" and mayor.timestamp.startswith("2024-05-01")
    # 3 recent-change pages + 1 revisions request + labels the bodies could not give.
    assert rep.requests <= 6
    # Labels are cached: asking again costs no request.
    before = len(server.requests)
    lookup = CachedLabelLookup(client(server), db)
    assert lookup(["Q902712", "Q42"]) == {"Q902712": "Dirk Gently's Holistic Detective Agency", "Q42": "Douglas Adams"}
    assert len(server.requests) == before and lookup.api_lookups == 0


def test_running_the_same_window_twice_adds_nothing(server, kedit_home):
    db = open_db(kedit_home / "wd.duckdb")
    ingest_window(client(server), db, START, END)
    first = snapshot(db)
    again = ingest_window(client(server), db, START, END, resume=False)
    assert again.revisions_new == 0 and again.changes_new == 0 and again.revisions_already_stored == 12
    assert snapshot(db) == first


class CrashingClient(WikidataClient):
    """Dies (like a killed process) on its n-th content request."""

    def __init__(self, *a, crash_on: int, **kw):
        super().__init__(*a, **kw)
        self.calls, self.crash_on = 0, crash_on

    def fetch_revisions(self, revids):
        self.calls += 1
        if self.calls == self.crash_on:
            raise KeyboardInterrupt("simulated kill")
        return super().fetch_revisions(revids)


def test_resume_after_a_crash_loses_nothing(server, kedit_home):
    clean_db = open_db(kedit_home / "clean.duckdb")
    ingest_window(client(server), clean_db, START, END, batch_size=3, commit_revisions=3)
    db = open_db(kedit_home / "crashed.duckdb")
    crasher = CrashingClient(endpoint=server.url, rate_limit_per_s=None, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        ingest_window(crasher, db, START, END, batch_size=3, commit_revisions=3)
    partial = wikidata_store.revision_rows(db)
    assert 0 < len(partial) < 12  # whole batches only
    cursor = json.loads(ledger.get_cursor(db, "wikidata:recentchanges"))
    assert cursor["done_until"] == max(r["timestamp"] for r in partial).strftime("%Y-%m-%dT%H:%M:%SZ")
    rep = ingest_window(client(server), db, START, END, batch_size=3, commit_revisions=3)
    assert rep.resumed_from == cursor["done_until"]
    assert rep.revisions_new == 12 - len(partial)
    assert snapshot(db) == snapshot(clean_db)


def test_policy_knobs_change_outcomes(server, kedit_home):
    db = open_db(kedit_home / "wd.duckdb")
    # Bots allowed; every account is looked up, and one with at most 10 edits counts as new.
    cfg = FilterConfig(allow_bots=True, mass_change_min_revisions=1, new_account_max_edits=10)
    ingest_window(client(server), db, START, END, cfg)
    status = {r["revid"]: r["status"] for r in wikidata_store.revision_rows(db)}
    assert status[2150000108] == "diffed"
    [bot_change] = [r for r in wikidata_store.fact_change_rows(db) if r["revid"] == 2150000108]
    assert bot_change["property"] == "P402" and bot_change["status"] == "accepted"
    [users_call] = [r["params"] for r in server.requests if r["params"].get("list") == "users"]
    assert {"Xyzzy2024", "Stadtchronist", "KrBot"} <= set(users_call["ususers"].split("|"))
    assert "203.0.113.45" not in users_call["ususers"]  # anonymous: no account to look up
    # Only the new account's change is held back; veterans' edits go through.
    quarantined = wikidata_store.fact_change_rows(db, status="quarantined")
    assert [r["revid"] for r in quarantined] == [2150000111]
    relaxed = FilterConfig(allow_bots=True, mass_change_min_revisions=1, new_account_max_edits=10,
                           profane_stems=(), profane_words=())
    db2 = open_db(kedit_home / "wd2.duckdb")
    ingest_window(client(server), db2, START, END, relaxed)
    [q] = wikidata_store.fact_change_rows(db2, status="quarantined")
    assert q["reason"] == "mass change by new account Xyzzy2024 (1 revisions in the window)"


def test_backfill_items_by_day_resumes(server, kedit_home):
    db = open_db(kedit_home / "wd.duckdb")
    items = ["Q1040", "Q571"]
    rep = backfill_items(client(server), db, items, "2024-04-30T00:00:00Z", "2024-05-03T00:00:00Z", progress=False)
    assert rep.revisions_seen == 4 and rep.revisions_new == 4
    changes = {(c.property, c.kind) for c in wikidata_store.get_fact_changes(db)}
    assert changes == {("P6", "updated"), ("P1082", "updated")}
    status = {r["revid"]: r["reason"] for r in wikidata_store.revision_rows(db)}
    assert status[2150000106] == "reverted later (mw-reverted tag)"
    again = backfill_items(client(server), db, items, "2024-04-30T00:00:00Z", "2024-05-03T00:00:00Z", progress=False)
    assert again.resumed_from == "2024-05-03T00:00:00Z" and again.revisions_new == 0


def _dump_xml(pages: list[tuple[str, list[dict]]]) -> str:
    out = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">',
           "<siteinfo><sitename>Wikidata</sitename></siteinfo>"]
    for title, revs in pages:
        out.append(f"<page><title>{title}</title><ns>0</ns><id>1</id>")
        for r in revs:
            parent = f"<parentid>{r['parent']}</parentid>" if r.get("parent") else ""
            who = f"<ip>{r['user']}</ip>" if r.get("anon") else f"<username>{r['user']}</username><id>7</id>"
            text = ('<text bytes="0" deleted="deleted" />' if r.get("hidden") else
                    f'<text bytes="1" xml:space="preserve">{escape(r["text"])}</text>')
            out.append(f"<revision><id>{r['id']}</id>{parent}<timestamp>{r['ts']}</timestamp>"
                       f"<contributor>{who}</contributor><comment>{escape(r.get('comment', ''))}</comment>"
                       f"<model>wikibase-item</model><format>application/json</format>{text}</revision>")
        out.append("</page>")
    out.append("</mediawiki>")
    return "\n".join(out)


def test_ingest_incremental_dump_with_legacy_and_current_json(server, kedit_home, tmp_path):
    day = {p.stem: json.loads(p.read_text()) for p in (DAY / "revisions").glob("*.json")}
    legacy_1 = {"entity": "q999000201", "label": {"en": "Example town"},
                "claims": [{"m": ["value", 31, "wikibase-entityid", {"entity-type": "item", "numeric-id": 5}],
                            "q": [], "g": "q999000201$1", "rank": 1}]}
    legacy_2 = {**legacy_1, "claims": legacy_1["claims"] + [
        {"m": ["value", 1082, "quantity", {"amount": "+1200", "unit": "1"}], "q": [], "g": "q999000201$2", "rank": 1}]}
    pages = [
        ("Q1040", [  # incremental dump: the parent (619336121) is not in the file
            {"id": 2150000103, "parent": 619336121, "ts": "2024-05-01T09:02:40Z", "user": "Stadtchronist",
             "text": json.dumps(day["2150000103"]["entity"])},
            {"id": 2150000109, "parent": 2150000103, "ts": "2024-05-01T14:30:00Z", "user": "Stadtchronist",
             "text": json.dumps(day["2150000109"]["entity"])}]),
        ("Q999000201", [
            {"id": 90, "ts": "2013-01-01T00:00:00Z", "user": "Early", "text": json.dumps(legacy_1)},
            {"id": 91, "parent": 90, "ts": "2013-01-02T00:00:00Z", "user": "Early", "text": json.dumps(legacy_2)},
            {"id": 92, "parent": 91, "ts": "2013-01-03T00:00:00Z", "user": "Hidden", "hidden": True},
            {"id": 93, "parent": 92, "ts": "2013-01-04T00:00:00Z", "user": "Broken", "text": '{"claims": {"P31": ['}]),
        ("Q2112", [{"id": 94, "parent": 363579534, "ts": "2024-05-01T13:05:09Z", "user": "KrBot",
                    "text": json.dumps(day["2150000108"]["entity"])}]),
    ]
    path = tmp_path / "wikidatawiki-20240501-pages-meta-hist-incr.xml.bz2"
    path.write_bytes(bz2.compress(_dump_xml(pages).encode()))
    labels = {"Q999000201": "Example town", "Q5": "human"}

    # Without an API client the first revision of Q1040 cannot be diffed: recorded, not lost.
    offline = open_db(kedit_home / "offline.duckdb")
    rep = ingest_dump(path, offline, progress=False, labels=lambda ids: {i: labels[i] for i in ids if i in labels})
    status = {r["revid"]: (r["status"], r["reason"]) for r in wikidata_store.revision_rows(offline)}
    assert rep.revisions_seen == 7
    assert status[2150000103][0] == "failed" and "not in the dump" in status[2150000103][1]
    assert status[92][0] == "failed" and "hidden" in status[92][1]
    assert status[93][0] == "failed" and "unreadable entity JSON" in status[93][1]
    assert status[94] == ("filtered", "bot edit (policy: allow_bots=False)")  # "...Bot" name in a dump
    legacy = {(c.revid, c.property, c.kind) for c in wikidata_store.get_fact_changes(offline, status=None)
              if c.subject == "Q999000201"}
    assert legacy == {(90, "P31", "added"), (91, "P1082", "added")}

    # With the API client the missing parent is fetched; a re-run adds nothing.
    db = open_db(kedit_home / "online.duckdb")
    ingest_dump(path, db, client=client(server), progress=False)
    got = {(c.revid, c.property) for c in wikidata_store.get_fact_changes(db)}
    assert {(2150000103, "P6"), (2150000109, "P1082")} <= got
    again = ingest_dump(path, db, client=client(server), progress=False, cursor_name="fresh-cursor")
    assert again.revisions_new == 0 and again.revisions_already_stored == 7
