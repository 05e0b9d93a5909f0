"""Ledger reads and writes for corrections (`kedit_core.corrections`): the pending and the
applied Wikidata-derived cases as `FactEdit`s, and the decisions written back with their
reasons. Each function is one transaction."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kedit_core.corrections import Decision, FactEdit, fact_edit
from kedit_core.filters import is_revert
from kedit_core.types import EditCase
from storage.db import Database
from storage.ledger import _rows, utcnow


def _edit(body: str, tags: str | None = None, comment: str | None = None,
          version_id: int | None = None) -> FactEdit | None:
    case = EditCase.from_json(body)
    return fact_edit(case.case_id, case.meta, case.relation, case.target_new, is_revert(_tag_list(tags), comment),
                     version_id)


def _tag_list(tags: str | None) -> list[str]:
    try:
        value = json.loads(tags) if tags else []
    except ValueError:
        return []
    return [str(t) for t in value] if isinstance(value, list) else []


def pending_fact_edits(db: Database) -> list[FactEdit]:
    """Pending cases that came from Wikidata revisions, each marked when its revision is a revert."""
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT c.body, r.tags, r.comment FROM edit_cases c "
            "LEFT JOIN fact_changes f ON c.change_id = f.change_id LEFT JOIN revisions r ON f.revid = r.revid "
            "WHERE c.status = 'pending' AND c.source = 'wikidata' ORDER BY c.case_id"
        ).fetchall()
    return [e for e in (_edit(*r) for r in rows) if e is not None]


def applied_fact_edits(db: Database) -> list[FactEdit]:
    """Applied Wikidata-derived cases of the subjects that have pending cases, with the version
    their batch produced. Only those subjects: months of applied cases are not read (and their
    JSON bodies parsed) every night for the few facts that changed again."""
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT c.body, b.version_id FROM edit_cases c LEFT JOIN edit_batches b ON c.batch_id = b.batch_id "
            "WHERE c.status = 'applied' AND c.source = 'wikidata' AND json_extract_string(c.body, '$.meta.subject_id') "
            "IN (SELECT json_extract_string(p.body, '$.meta.subject_id') FROM edit_cases p "
            "WHERE p.status = 'pending' AND p.source = 'wikidata') ORDER BY c.case_id"
        ).fetchall()
    return [e for e in (_edit(body, version_id=vid) for body, vid in rows) if e is not None]


def record_decisions(db: Database, decisions: Sequence[Decision], run_id: str | None) -> int:
    """Set each case's status and reason and log the decision, in one transaction. A case
    still pending is only touched when its status or reason changes (a revert that waits
    several runs is logged once). Returns the number of decisions that changed something."""
    if not decisions:
        return 0
    now = utcnow()
    changed = 0
    with db.connect() as con:
        current = dict(
            ((cid, (status, reason)) for cid, status, reason in con.execute(
                "SELECT case_id, status, reason FROM edit_cases WHERE list_contains(?, case_id)",
                [[d.case_id for d in decisions]]).fetchall())
        )
        for d in decisions:
            if current.get(d.case_id) == (d.status, d.reason) or _logged(con, d):
                continue
            con.execute("UPDATE edit_cases SET status = ?, reason = ?, updated = ? WHERE case_id = ?",
                        [d.status, d.reason, now, d.case_id])
            con.execute("INSERT INTO case_decisions (case_id, run_id, status, reason, created) VALUES (?, ?, ?, ?, ?)",
                        [d.case_id, run_id, d.status, d.reason, now])
            changed += 1
    return changed


def _logged(con: Any, d: Decision) -> bool:
    """A pending decision already logged (its reason was since replaced, e.g. by 'waiting')."""
    if d.status != "pending":
        return False
    return con.execute("SELECT 1 FROM case_decisions WHERE case_id = ? AND status = ? AND reason = ?",
                       [d.case_id, d.status, d.reason]).fetchone() is not None


def decision_rows(db: Database, case_id: str | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM case_decisions", []
    if case_id:
        sql += " WHERE case_id = ?"
        params.append(case_id)
    with db.connect(read_only=True) as con:
        return _rows(con, sql + " ORDER BY created, case_id", params)


def applied_case_versions(db: Database) -> list[dict[str, Any]]:
    """Every applied Wikidata-derived case with the model version its batch produced:
    [{"case": EditCase, "version_id": int | None}], by case id (`kedit demo` shows the
    facts a week changed more than once, and asks the current ones)."""
    with db.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT c.body, b.version_id FROM edit_cases c LEFT JOIN edit_batches b ON c.batch_id = b.batch_id "
            "WHERE c.status = 'applied' AND c.source = 'wikidata' ORDER BY c.case_id"
        ).fetchall()
    return [{"case": EditCase.from_json(body), "version_id": vid} for body, vid in rows]
