"""Issue 23, point 2: one malformed entity body must not stop a night's ingest. The recorded
day (data/wikidata_day) is served by the replay server with the body of revision 2150000104
(Q131261, a P54 transfer) mutated in one way per case; the real client and `ingest_window`
read the window: it completes, that revision is stored `failed` with a reason naming the
problem, and every other revision comes out as it does from the untouched recording."""
from __future__ import annotations

import json
import shutil

import pytest

from flows.services.ingest import ingest_window
from connectors.replay import ReplayServer
from connectors.wikidata import WikidataClient
from storage import ledger, wikidata_store
from storage.db import open_db
from tests.conftest import DAY_END as END
from tests.conftest import DAY_START as START
from tests.conftest import WIKIDATA_DAY as DAY

BAD = 2150000104


def _p54(e: dict) -> dict:
    return e["claims"]["P54"][0]


def _set(obj: dict, key: str, value) -> None:
    obj[key] = value


# (case id, mutation of the entity dict (or the raw content string it returns), reason fragment)
MUTATIONS = [
    ("claims-a-list", lambda e: _set(e, "claims", ["P54"]), "claims is a list, not an object"),
    ("claims-a-string", lambda e: _set(e, "claims", "P54"), "claims is a string, not an object"),
    ("statements-an-object", lambda e: _set(e["claims"], "P54", {"0": _p54(e)}),
     "claims.P54 is an object, not a list of statements"),
    ("statement-a-string", lambda e: _set(e["claims"]["P54"], 0, "Q15789"),
     "new revision: claims.P54[0] is a string, not a statement object"),
    ("mainsnak-a-list", lambda e: _set(_p54(e), "mainsnak", ["value", "P54"]),
     "claims.P54[0].mainsnak is a list, not an object"),
    ("datavalue-a-string", lambda e: _set(_p54(e)["mainsnak"], "datavalue", "Q15789"),
     "claims.P54[0].mainsnak.datavalue is a string, not an object"),
    ("datavalue-type-a-number", lambda e: _set(_p54(e)["mainsnak"]["datavalue"], "type", 7),
     "mainsnak.datavalue.type is a number, not a string"),
    ("qualifier-snaks-a-string", lambda e: _set(_p54(e), "qualifiers", {"P582": "2024-04-30"}),
     "claims.P54[0].qualifiers.P582 is a string, not a list of snaks"),
    ("rank-a-list", lambda e: _set(_p54(e), "rank", ["normal"]), "claims.P54[0].rank is a list, not a string"),
    ("statement-id-a-number", lambda e: _set(_p54(e), "id", 42), "claims.P54[0].id is a number, not a string"),
    ("label-a-string", lambda e: _set(e["labels"], "en", "Oliver Kahn"), "labels.en is a string, not an object"),
    ("aliases-strings", lambda e: _set(e, "aliases", {"en": ["Titan"]}), "aliases.en is a list, not a list of objects"),
    ("sitelinks-a-list", lambda e: _set(e, "sitelinks", ["enwiki"]), "sitelinks is a list, not an object"),
    ("id-a-number", lambda e: _set(e, "id", 131261), "id is a number, not a string"),
    ("another-entity", lambda e: _set(e, "id", "Q42"), "different entities (Q131261 and Q42)"),
    ("not-an-object", lambda e: "[1, 2, 3]", "entity JSON must be an object"),
    ("nested-too-deeply", lambda e: "[" * 200_000 + "]" * 200_000, "nested too deeply"),
]


@pytest.mark.parametrize("mutate,reason", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_a_malformed_revision_is_recorded_failed_and_the_window_completes(tmp_path, kedit_home, mutate, reason):
    folder = tmp_path / "day"
    shutil.copytree(DAY, folder)
    path = folder / "revisions" / f"{BAD}.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    out = mutate(rec["entity"])
    if isinstance(out, str):  # a raw body instead of the entity
        rec.pop("entity")
        rec["content"] = out
    path.write_text(json.dumps(rec), encoding="utf-8")

    db = open_db(kedit_home / "wd.duckdb")
    with ReplayServer(folder) as url:
        client = WikidataClient(endpoint=url, rate_limit_per_s=None, sleep=lambda s: None)
        rep = ingest_window(client, db, START, END)
    # The window completed: every revision stored, the cursor at its end.
    assert rep.revisions_seen == rep.revisions_new == 12
    status = {r["revid"]: (r["status"], r["reason"]) for r in wikidata_store.revision_rows(db)}
    assert status[BAD][0] == "failed" and reason in status[BAD][1], status[BAD]
    assert "\n" not in status[BAD][1] and len(status[BAD][1]) < 300
    assert rep.revisions_failed == 2  # this one and the recording's hidden revision
    # Every other revision as from the untouched recording.
    accepted = {(c.subject, c.property, c.kind) for c in wikidata_store.get_fact_changes(db)}
    assert {("Q1040", "P6", "updated"), ("Q1040", "P1082", "updated"), ("Q328212", "P166", "added"),
            ("Q42", "P800", "added")} <= accepted
    assert not any(s == "Q131261" for s, _, _ in accepted)
    assert status[2150000112][0] == "failed" and status[2150000110][0] == "filtered"
    assert json.loads(ledger.get_cursor(db, "wikidata:recentchanges"))["done_until"] == END
