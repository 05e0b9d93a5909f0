"""The quarantine, as an operator acts on it (`kedit quarantine list|release|reject`).

Ingestion holds back suspicious fact changes with status 'quarantined' and a reason
(`kedit_core.filters.change_verdict`: profanity, keyboard mash, mass changes by a new
account); nothing applies them. An operator then decides, one change at a time:

- release: the change goes back to 'accepted', so the next run's case step makes an edit
  case of it (and the corrections step orders it against what the model already holds);
- reject: the change becomes 'rejected' for good; no run reads it again.

Each decision is one transaction: the change's status and reason, and a row in
`quarantine_decisions` with who decided, why, and the quarantine reason it had.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kedit_core.errors import KeditError
from storage.db import Database
from storage.ledger import _rows, utcnow

DECISIONS = {"release": ("released", "accepted"), "reject": ("rejected", "rejected")}


class QuarantineError(KeditError):
    """An id that names no quarantined change, or a decision kedit cannot record."""


def quarantined(db: Database, decided: bool = False) -> list[dict[str, Any]]:
    """Quarantined fact changes, oldest revision first, with their revision's user, time and
    comment; with `decided`, also those an operator released or rejected, with the decision."""
    where = "f.status = 'quarantined'"
    if decided:
        where += " OR f.change_id IN (SELECT change_id FROM quarantine_decisions)"
    with db.connect(read_only=True) as con:
        rows = _rows(
            con,
            "SELECT f.change_id, f.revid, f.subject, f.property, f.kind, f.old_value, f.new_value, f.status, "
            "f.reason, f.timestamp, r.user_name, r.comment, l.label AS subject_label, "
            "d.decision, d.decided_by, d.reason AS decision_reason, d.quarantine_reason, d.created AS decided "
            "FROM fact_changes f LEFT JOIN revisions r ON f.revid = r.revid "
            "LEFT JOIN entity_labels l ON l.entity_id = f.subject AND l.lang = 'en' "
            "LEFT JOIN (SELECT *, row_number() OVER (PARTITION BY change_id ORDER BY created DESC) AS n "
            "           FROM quarantine_decisions) d ON d.change_id = f.change_id AND d.n = 1 "
            f"WHERE {where} ORDER BY f.timestamp, f.revid, f.change_id"
        )
    for r in rows:
        for side in ("old_value", "new_value"):
            r[side] = json.loads(r[side]) if r[side] else None
    return rows


def decision_rows(db: Database, change_id: str | None = None) -> list[dict[str, Any]]:
    sql, params = "SELECT * FROM quarantine_decisions", []
    if change_id:
        sql, params = sql + " WHERE change_id = ?", [change_id]
    with db.connect(read_only=True) as con:
        return _rows(con, sql + " ORDER BY created, change_id", params)


def resolve(con: Any, given: str) -> tuple[str, str, str | None]:
    """(change_id, status, reason) of the change an operator named: its full id or a unique
    prefix of at least 6 characters. A one-line QuarantineError otherwise."""
    given = given.strip()
    if len(given) < 6:
        raise QuarantineError(f"change id {given!r} is too short: give at least 6 characters "
                              "(`kedit quarantine list` shows the ids)")
    rows = con.execute("SELECT change_id, status, reason FROM fact_changes WHERE starts_with(change_id, ?)",
                       [given]).fetchall()
    if not rows:
        raise QuarantineError(f"no fact change {given!r} in the ledger (`kedit quarantine list` shows the ids)")
    if len(rows) > 1:
        raise QuarantineError(f"change id {given!r} is ambiguous ({len(rows)} changes start with it): give more of it")
    return rows[0][0], rows[0][1], rows[0][2]


def decide(db: Database, change_ids: Sequence[str], action: str, by: str, reason: str) -> list[dict[str, Any]]:
    """Release or reject quarantined changes, all or none: an id that names no quarantined
    change fails the whole call before anything is written. Returns what was decided."""
    if action not in DECISIONS:
        raise QuarantineError(f"unknown quarantine decision {action!r}: use release or reject")
    if not reason or not reason.strip():
        raise QuarantineError(f"say why: --reason is recorded with the decision to {action}")
    if not by or not by.strip():
        raise QuarantineError("say who decides: --by NAME")
    if not change_ids:
        raise QuarantineError(f"name the changes to {action} (`kedit quarantine list` shows the ids)")
    decision, new_status = DECISIONS[action]
    now = utcnow()
    done: list[dict[str, Any]] = []
    with db.connect() as con:  # one transaction: all decided, or none
        seen = set()
        for given in change_ids:
            cid, status, old_reason = resolve(con, given)
            if cid in seen:
                continue
            seen.add(cid)
            if status != "quarantined":
                last = con.execute("SELECT decision, decided_by FROM quarantine_decisions WHERE change_id = ? "
                                   "ORDER BY created DESC LIMIT 1", [cid]).fetchone()
                how = f" ({last[0]} by {last[1]})" if last else ""
                raise QuarantineError(f"change {cid} is not in quarantine: its status is {status!r}{how}")
            note = (f"released from quarantine by {by}: {reason}" if decision == "released"
                    else f"rejected by {by}: {reason} (quarantined: {old_reason})")
            con.execute("UPDATE fact_changes SET status = ?, reason = ? WHERE change_id = ?", [new_status, note, cid])
            con.execute("INSERT INTO quarantine_decisions (change_id, decision, decided_by, reason, "
                        "quarantine_reason, created) VALUES (?, ?, ?, ?, ?, ?)",
                        [cid, decision, by.strip(), reason.strip(), old_reason, now])
            done.append({"change_id": cid, "decision": decision, "status": new_status,
                         "quarantine_reason": old_reason})
    return done
