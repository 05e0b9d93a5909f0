"""kedit_core.filters: every dropped change gets a reason; suspicious ones are quarantined."""
from __future__ import annotations

from kedit_core.filters import (
    FilterConfig,
    candidate_mass_users,
    change_verdict,
    content_reverts,
    is_nonsense,
    is_profane,
    mass_change_users,
    reverted_revisions,
    revision_verdict,
    scope_verdict,
)
from kedit_core.revision import RevisionRef
from kedit_core.types import FactChange

CFG = FilterConfig()
LABELS = {"Q1040": "Karlsruhe", "Q5": "human", "Q1443774": "Frank Mentrup", "Q999": "Lena Hartmann"}


def ref(revid: int, ts: str, item: str = "Q1040", user: str = "Ed", tags=(), comment: str = "", **kw) -> RevisionRef:
    return RevisionRef(item=item, revid=revid, old_revid=revid - 1, timestamp=ts, user=user, tags=tuple(tags),
                       comment=comment, **kw)


def change(new: dict | None, old: dict | None = None, subject: str = "Q1040", prop: str = "P6",
           ts: str = "2024-05-01T10:00:00Z", revid: int = 1) -> FactChange:
    kind = "updated" if old and new else ("added" if new else "removed")
    return FactChange(subject, prop, old, new, kind, revid, ts)


def item(q: str) -> dict:
    return {"type": "wikibase-item", "id": q}


def text(t: str, lang: str = "en") -> dict:
    return {"type": "monolingualtext", "text": t, "language": lang}


def test_reverted_by_tag_undo_and_rollback_within_the_settle_window():
    refs = [
        ref(10, "2024-05-01T10:00:00Z", tags=["mw-reverted"]),
        ref(11, "2024-05-01T11:00:00Z", item="Q2", user="Vandal"),
        ref(12, "2024-05-01T11:30:00Z", item="Q2", user="Patroller", tags=["mw-undo"],
            comment="/* undo:0||11|Vandal */"),
        ref(20, "2024-05-01T12:00:00Z", item="Q3", user="Mass"),
        ref(21, "2024-05-01T12:01:00Z", item="Q3", user="Mass"),
        ref(22, "2024-05-01T12:05:00Z", item="Q3", user="Admin", tags=["mw-rollback"],
            comment="Reverted edits by [[Special:Contributions/Mass|Mass]] ([[User talk:Mass|talk]]) to last revision by X"),
        ref(30, "2024-05-01T12:00:00Z", item="Q4", user="Slow"),
        ref(31, "2024-05-04T12:00:00Z", item="Q4", user="Late", comment="/* undo:0||30|Slow */"),
    ]
    rev = reverted_revisions(refs, CFG)
    assert rev[10] == "reverted later (mw-reverted tag)"
    assert "by revision 12" in rev[11]
    assert "by revision 22" in rev[20] and "by revision 22" in rev[21]
    assert 30 not in rev  # undone 72 h later: outside the 48 h settle window
    assert 30 in reverted_revisions(refs, FilterConfig(settle_hours=96))
    v = revision_verdict(refs[1], CFG, rev)
    assert v.status == "filtered" and "reverted within 48h" in v.reason
    assert "a revert" in revision_verdict(refs[2], CFG, rev).reason
    assert revision_verdict(refs[6], CFG, rev).accepted
    # The undo within the window is filtered with its target; the late one (72 h) is diffed,
    # and kedit_core.corrections decides against the ledger whether it undoes an applied value.
    assert rev[12] == rev[22] == "a revert: restores an earlier state, not a new fact"
    assert 31 not in rev and revision_verdict(refs[7], CFG, rev).accepted


def test_bot_and_anonymous_policy_is_configurable():
    bot = ref(1, "2024-05-01T00:00:00Z", user="KrBot", is_bot=True)
    anon = ref(2, "2024-05-01T00:00:00Z", user="203.0.113.5", is_anon=True)
    assert revision_verdict(bot, CFG, {}).reason == "bot edit (policy: allow_bots=False)"
    assert revision_verdict(anon, CFG, {}).reason == "anonymous edit (policy: allow_anonymous=False)"
    lenient = FilterConfig(allow_bots=True, allow_anonymous=True)
    assert revision_verdict(bot, lenient, {}).accepted and revision_verdict(anon, lenient, {}).accepted


def test_label_only_and_no_statement_edits_are_named():
    assert scope_verdict([], {"labels", "sitelinks"}).reason == "labels/sitelinks-only edit (no statement changed)"
    assert "references, qualifiers or ranks" in scope_verdict([], set()).reason
    assert scope_verdict([change(item("Q999"))], {"labels"}).accepted


def test_change_level_reasons():
    r = ref(5, "2024-05-01T10:00:00Z")
    ok = change(item("Q999"), item("Q1443774"))
    assert change_verdict(ok, r, CFG, LABELS).accepted
    v = change_verdict(change(item("Q12345")), r, CFG, LABELS)
    assert (v.status, v.reason) == ("filtered", "no English label for new value Q12345")
    v = change_verdict(change(item("Q999"), subject="Q777"), r, CFG, LABELS)
    assert v.reason == "no English label for subject Q777"
    assert change_verdict(change(item("Q12345")), r, FilterConfig(require_english_labels=False), LABELS).accepted
    long_name = text("The Most Serene and Ancient Free Imperial City of Karlsruhe in the Grand Duchy of Baden, Germany")
    assert "too long" in change_verdict(change(long_name, prop="P1448"), r, CFG, LABELS).reason
    assert change_verdict(change(text("Karlsruhe", "de"), prop="P1448"), r, CFG, LABELS).reason == \
        "monolingual text not in English (de)"
    unsupported = {"type": "unsupported", "datatype": "wikibase-frob", "raw": 1, "error": "unknown datatype wikibase-frob"}
    assert "unsupported value" in change_verdict(change(unsupported, prop="P9"), r, CFG, LABELS).reason


def test_profanity_and_nonsense_are_quarantined_not_applied():
    r = ref(5, "2024-05-01T10:00:00Z")
    v = change_verdict(change(text("Veronica Fuckface"), text("Veronica Roth", "es"), prop="P1477"), r, CFG, LABELS)
    assert v.status == "quarantined" and "profanity" in v.reason
    v = change_verdict(change(text("asdfghjkl"), text("Karlsruhe"), prop="P1448"), r, CFG, LABELS)
    assert v.status == "quarantined" and "nonsense" in v.reason
    # The label of a new item value counts as its text.
    v = change_verdict(change(item("Q66")), r, CFG, {**LABELS, "Q66": "total bullshit"})
    assert v.status == "quarantined"
    assert not is_profane("Scunthorpe United", CFG) and not is_profane("Dickens", CFG)
    assert is_profane("you idiot", CFG)
    assert is_nonsense("aaaaaaa") and is_nonsense("lolololol") and is_nonsense("xkcdqzptr")
    assert not is_nonsense("Karlsruhe") and not is_nonsense("rhythms of Strength")


def test_mass_changes_by_a_new_account():
    refs = [ref(100 + i, f"2024-05-01T10:{i:02d}:00Z", item=f"Q{i}", user="Fresh") for i in range(25)]
    refs += [ref(200 + i, f"2024-05-01T11:{i:02d}:00Z", item=f"Q{i}", user="Veteran") for i in range(25)]
    refs += [ref(300, "2024-05-01T12:00:00Z", user="Casual")]
    assert candidate_mass_users(refs, CFG) == ["Fresh", "Veteran"]
    users = {"Fresh": {"editcount": 30, "registration": "2024-04-30T00:00:00Z"},
             "Veteran": {"editcount": 90000, "registration": "2013-01-01T00:00:00Z"}}
    flagged = mass_change_users(refs, users, CFG)
    assert list(flagged) == ["Fresh"] and "25 revisions" in flagged["Fresh"]
    v = change_verdict(change(item("Q999")), refs[0], CFG, LABELS, flagged)
    assert v.status == "quarantined" and "new account Fresh" in v.reason


def test_content_reverts_without_tags():
    a = change(item("Q999"), item("Q1443774"), ts="2024-05-01T10:00:00Z", revid=1)
    b = change(item("Q1443774"), item("Q999"), ts="2024-05-01T10:30:00Z", revid=2)
    other = change(item("Q5"), None, prop="P31", ts="2024-05-01T10:10:00Z", revid=3)
    out = content_reverts([b, other, a], CFG)
    assert set(out) == {a.change_id, b.change_id}
    assert "undone within 48h by revision 2" == out[a.change_id]
    late = change(item("Q1443774"), item("Q999"), ts="2024-05-05T10:30:00Z", revid=4)
    assert content_reverts([a, late], CFG) == {}


def test_a_revert_is_matched_across_a_datatype_relabel():
    # The vandal edit was made while P227 still read `string`; the revert after the 2016
    # relabel reads `external-id`. The same strings, so it is the same fact undone.
    a = change({"type": "external-id", "value": "vandal"}, {"type": "string", "value": "118651412"},
               prop="P227", ts="2016-05-01T10:00:00Z", revid=1)
    b = change({"type": "external-id", "value": "118651412"}, {"type": "external-id", "value": "vandal"},
               prop="P227", ts="2016-05-01T12:00:00Z", revid=2)
    assert set(content_reverts([a, b], CFG)) == {a.change_id, b.change_id}
