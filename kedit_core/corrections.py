"""Which pending edit cases still say something new, given what the model already holds
(pure: the caller reads the ledger and writes the decisions back).

A fact (`kedit_core.qa.fact_key`: subject and property for a single-valued relation) can
change again after an edit of it was applied: a correction, a later change, or a revert of
a vandal edit that survived the settle window. Wikidata's latest revision is the truth, so
per fact, in revision-time order:

1. a pending case older than the applied one (a backfill of old days) is 'superseded':
   a historical value never overwrites a newer applied one;
2. of the pending cases left, the latest wins; the others are 'superseded' by it;
3. when the winner is a revert (undo, rollback, manual revert), it is an edit only if it
   changes what the model holds: it undoes an applied value ("reverts revision R applied
   in version V"), or restores a value the model does not hold yet; a revert of a change
   that was never applied is 'filtered': nothing to undo.

Every decision carries its reason, so the ledger can say why a case was not applied.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kedit_core.diff import value_key
from kedit_core.qa import fact_key


@dataclass(frozen=True)
class FactEdit:
    """One Wikidata-derived case, as far as ordering and reverts care."""

    case_id: str
    key: tuple[str, ...]
    revid: int
    timestamp: str  # the revision's time, ISO 8601 UTC (compares as a string)
    old_key: str  # value_key of the value the revision replaced
    new_key: str  # value_key of the value it set
    answer: str  # the new value as the model should say it
    is_revert: bool = False
    version_id: int | None = None  # for an applied case: the version that holds it

    @property
    def order(self) -> tuple[str, int]:
        return (self.timestamp, self.revid)


def fact_edit(case_id: str, meta: Mapping[str, Any], relation: str, answer: str, is_revert: bool = False,
              version_id: int | None = None) -> FactEdit | None:
    """A `FactEdit` from a case's meta (`kedit_core.qa.build_cases` writes it); None for a case
    that did not come from a Wikidata revision (a benchmark's)."""
    subject, revid, ts = meta.get("subject_id"), meta.get("revid"), meta.get("timestamp")
    if not subject or revid is None or not ts:
        return None
    return FactEdit(case_id, fact_key(subject, relation, meta.get("new_value")), int(revid), str(ts),
                    value_key(meta.get("old_value")), value_key(meta.get("new_value")), answer, is_revert,
                    version_id)


@dataclass(frozen=True)
class Decision:
    case_id: str
    status: str  # superseded | filtered | pending (a revert that stays an edit, with its reason)
    reason: str


def latest_applied(applied: Iterable[FactEdit]) -> dict[tuple[str, ...], FactEdit]:
    """Per fact, the applied case with the latest revision: what the model holds from us."""
    held: dict[tuple[str, ...], FactEdit] = {}
    for a in applied:
        if a.key not in held or a.order > held[a.key].order:
            held[a.key] = a
    return held


def reconcile(pending: Iterable[FactEdit], applied: Iterable[FactEdit]) -> list[Decision]:
    """The decisions for pending cases (see the module docstring); a case that stays a plain
    pending edit gets none."""
    held = latest_applied(applied)
    by_fact: dict[tuple[str, ...], list[FactEdit]] = defaultdict(list)
    for p in pending:
        by_fact[p.key].append(p)
    out: list[Decision] = []
    for key, group in by_fact.items():
        out.extend(_decide_fact(sorted(group, key=lambda e: (e.order, e.case_id)), held.get(key)))
    return out


def _decide_fact(group: list[FactEdit], held: FactEdit | None) -> list[Decision]:
    out = []
    if held is not None:
        older = [e for e in group if e.order < held.order]
        out += [Decision(e.case_id, "superseded", f"older than applied revision {held.revid} of {held.timestamp}")
                for e in older]
        group = [e for e in group if e.order >= held.order]
    if not group:
        return out
    latest = group[-1]
    out += [Decision(e.case_id, "superseded",
                     f"superseded by revision {latest.revid} of {latest.timestamp}, a later change of the same fact")
            for e in group[:-1]]
    if latest.is_revert:
        out.append(_revert_decision(latest, held, group[:-1]))
    return out


def _revert_decision(revert: FactEdit, held: FactEdit | None, superseded: list[FactEdit]) -> Decision:
    """Whether a (late) revert changes what the model holds."""
    if held is not None:
        if held.new_key == revert.new_key:
            return Decision(revert.case_id, "filtered",
                            f"a revert to {revert.answer!r}, which the model already holds from revision "
                            f"{held.revid} (version {held.version_id}): nothing to undo")
        if held.new_key == revert.old_key:
            return Decision(revert.case_id, "pending",
                            f"reverts revision {held.revid} applied in version {held.version_id}: "
                            f"{held.answer!r} back to {revert.answer!r}")
        return Decision(revert.case_id, "pending",
                        f"a revert to {revert.answer!r}; the model holds {held.answer!r} from revision "
                        f"{held.revid} (version {held.version_id})")
    # Nothing of this fact was applied: the revert matters only if it restores a value that
    # was itself waiting (superseded above), e.g. a good change, then vandalism, then its undo.
    waiting = [e for e in superseded if e.new_key == revert.new_key]
    if waiting:
        return Decision(revert.case_id, "pending",
                        f"a revert to {revert.answer!r}, the value of revision {waiting[-1].revid} that was never "
                        "applied")
    return Decision(revert.case_id, "filtered", "a revert of a change that was never applied: nothing to undo")
