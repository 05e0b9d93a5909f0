"""Which Wikidata changes may become edit cases, and why the others may not (pure).

Every decision is a `Verdict` with a status and, unless accepted, a reason that is stored
next to the change, so a dropped change can always be explained:

- scope (`revision_verdict`, `follow_verdict`): an item the deployment does not follow
  (not in its item list, or fewer sitelinks than its floor; `parse_follow`);
- revision level (`revision_verdict`): reverted within the settle window (the `mw-reverted`
  tag, or undone / rolled back by a later edit), a revert of such an edit (it restores what
  the model never got), bot or anonymous edits (policy), edits that only touch labels,
  descriptions, aliases or sitelinks. A *late* revert (its target is older than the settle
  window, so it may have been applied) is diffed like any edit: `kedit_core.corrections`
  decides against the ledger whether it undoes an applied value;
- change level (`change_verdict`): unsupported or malformed values, monolingual text not in
  English, subject or value without an English label, values too long for a QA answer;
- suspicious changes are *quarantined* (kept for a human, never applied): a value replaced by
  profanity or keyboard-mash nonsense, and mass changes by one new account;
- `content_reverts`: a change X->Y followed within the window by Y->X on the same fact drops
  both, even when no revert tag says so.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from kedit_core.diff import value_key
from kedit_core.errors import KeditError
from kedit_core.revision import RevisionRef
from kedit_core.types import FactChange

Status = Literal["accepted", "filtered", "quarantined"]
REVERT_TAGS = ("mw-undo", "mw-rollback", "mw-manual-revert")

# A short list on purpose: the quarantine is a tripwire, not a content policy. Stems match
# inside words ("Fuckface"); whole words only where a stem would hit innocent names
# (the Scunthorpe problem).
PROFANE_STEMS = ("fuck", "shit", "bitch", "asshole", "dickhead", "wanker", "bollock", "motherf", "bullshit")
PROFANE_WORDS = ("cunt", "crap", "piss", "twat", "slut", "whore", "poop", "penis", "dick", "butt", "arse", "idiot",
                 "stupid", "sucks", "lol", "lmao", "nigger", "faggot", "retard")


@dataclass
class FilterConfig:
    settle_hours: float = 48.0  # an edit counts only if it survived this long
    allow_bots: bool = False  # bot edits are mostly imports and identifiers: noise for QA
    allow_anonymous: bool = False  # most vandalism on Wikidata comes from logged-out edits
    require_english_labels: bool = True
    english_text_only: bool = True  # monolingual text in other languages cannot be asked in English
    max_value_chars: int = 80
    profane_stems: tuple[str, ...] = PROFANE_STEMS
    profane_words: tuple[str, ...] = PROFANE_WORDS
    quarantine_nonsense: bool = True
    mass_change_min_revisions: int = 20  # one new account editing this many revisions in a window
    new_account_max_edits: int = 100
    new_account_max_age_days: float = 30.0
    # What a deployment follows (`parse_follow`): only these items (None: every item), and
    # only items with at least this many sitelinks in the edited revision (a popularity floor).
    follow_items: frozenset[str] | None = None
    min_sitelinks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # room for flows to record their own knobs


class FollowSpecError(KeditError):
    """A `follow` setting kedit cannot read; the message says what it accepts."""


_ITEM_ID = re.compile(r"^Q[1-9][0-9]*$")
_SITELINKS = re.compile(r"^sitelinks\s*>=\s*([0-9]+)$")


def parse_follow(spec: str | Iterable[str] | None) -> tuple[frozenset[str] | None, int]:
    """`follow` as (items or None, min sitelinks): "all" (or empty), a list of item ids
    ("Q42,Q64" or a list), or "sitelinks>=N" (items with at least N sitelinks)."""
    if spec is None:
        return None, 0
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p and p.strip()]
    if not parts or parts == ["all"]:
        return None, 0
    if len(parts) == 1 and _SITELINKS.match(parts[0]):
        return None, int(_SITELINKS.match(parts[0]).group(1))
    bad = [p for p in parts if not _ITEM_ID.match(p)]
    if bad:
        raise FollowSpecError(
            f"follow {', '.join(parts)!r}: {bad[0]!r} is not an item id; use 'all', a comma-separated list of "
            "item ids (Q42,Q64) or 'sitelinks>=N'"
        )
    return frozenset(parts), 0


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


ACCEPT = Verdict("accepted")


def _filtered(reason: str) -> Verdict:
    return Verdict("filtered", reason)


def parse_ts(ts: str) -> datetime:
    return datetime.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------- revisions

_UNDO_RE = re.compile(r"/\*\s*undo:\d+\|\|(\d+)\|")
_ROLLBACK_RE = re.compile(r"Reverted edits by \[\[Special:Contributions/([^|\]]+)")


REVERT_REASON = "a revert: restores an earlier state, not a new fact"


def is_revert(tags: Iterable[str], comment: str | None) -> bool:
    """Whether a revision says it is a revert (undo, rollback or a manual revert tag)."""
    comment = comment or ""
    return any(t in REVERT_TAGS for t in tags) or bool(_UNDO_RE.search(comment) or _ROLLBACK_RE.search(comment))


def reverted_revisions(refs: Iterable[RevisionRef], config: FilterConfig) -> dict[int, str]:
    """{revid: reason} for revisions reverted within the settle window, from tags and summaries,
    and for the reverts that undid them (filtered too: they restore what the model never got).
    A revert whose target is not found within the window is left out: it is a late revert,
    judged by content against what the ledger applied (`kedit_core.corrections`).

    `refs` should reach `settle_hours` past the window being ingested, so reverts of its last
    edits are seen."""
    refs = sorted(refs, key=lambda r: (r.timestamp, r.revid))
    window = timedelta(hours=config.settle_hours)
    out: dict[int, str] = {}
    by_item: dict[str, list[RevisionRef]] = {}
    for r in refs:
        by_item.setdefault(r.item, []).append(r)
        if "mw-reverted" in r.tags:
            out[r.revid] = "reverted later (mw-reverted tag)"
    for item_refs in by_item.values():
        for i, r in enumerate(item_refs):
            undo = _UNDO_RE.search(r.comment)
            rollback = _ROLLBACK_RE.search(r.comment)
            if not (undo or rollback or any(t in r.tags for t in REVERT_TAGS)):
                continue
            t = parse_ts(r.timestamp)
            earlier = [p for p in item_refs[:i] if t - parse_ts(p.timestamp) <= window]
            if undo:
                targets = [p for p in earlier if p.revid == int(undo.group(1))]
            elif rollback:  # rollback reverts the consecutive last edits of one user
                targets = []
                for p in reversed(earlier):
                    if p.user != rollback.group(1):
                        break
                    targets.append(p)
            else:  # a tagged revert without a readable summary: the edit just before it
                targets = earlier[-1:]
            for p in targets:
                out.setdefault(p.revid, f"reverted within {config.settle_hours:g}h by revision {r.revid}")
            if targets:
                out.setdefault(r.revid, REVERT_REASON)
    return out


def revision_verdict(ref: RevisionRef, config: FilterConfig, reverted: Mapping[int, str]) -> Verdict:
    """Whether a revision's changes may be used at all, before looking at them."""
    if config.follow_items is not None and ref.item not in config.follow_items:
        return _filtered(f"not followed: {ref.item} is not in the followed items")
    if ref.revid in reverted:  # reverted within the window, or a revert of such an edit
        return _filtered(reverted[ref.revid])
    # A revert not in `reverted` is a late one: diffed, and judged against the ledger later.
    if ref.is_bot and not config.allow_bots:
        return _filtered("bot edit (policy: allow_bots=False)")
    if ref.is_anon and not config.allow_anonymous:
        return _filtered("anonymous edit (policy: allow_anonymous=False)")
    return ACCEPT


def follow_verdict(entity: Mapping[str, Any] | None, config: FilterConfig) -> Verdict:
    """The sitelink floor of what a deployment follows, on the edited revision's entity."""
    if config.min_sitelinks <= 0:
        return ACCEPT
    n = len((entity or {}).get("sitelinks") or {})
    if n < config.min_sitelinks:
        return _filtered(f"not followed: {n} sitelink{'s' if n != 1 else ''} (follow: sitelinks>={config.min_sitelinks})")
    return ACCEPT


def scope_verdict(changes: list[FactChange], term_parts: set[str]) -> Verdict:
    """An edit with no statement change: say what it touched instead."""
    if changes:
        return ACCEPT
    if term_parts:
        return _filtered(f"{'/'.join(sorted(term_parts))}-only edit (no statement changed)")
    return _filtered("no change to current statements (references, qualifiers or ranks only)")


# --------------------------------------------------------------------------- suspicious text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def is_profane(text: str, config: FilterConfig) -> bool:
    low = text.lower()
    if any(stem in low for stem in config.profane_stems):
        return True
    words = set(_words(text))
    return any(w in words for w in config.profane_words)


_KEYBOARD_RUNS = ("qwert", "asdf", "sdfg", "zxcv", "hjkl", "jkjk", "uiop")


def is_nonsense(text: str) -> bool:
    """Keyboard mash: a long run of one character, keyboard rows, long vowel-less words, stutter."""
    low = text.lower()
    if re.search(r"(.)\1{4,}", low):
        return True
    if any(run in low for run in _KEYBOARD_RUNS):
        return True
    if re.search(r"(\w{2,3})\1{3,}", low):  # "lolololol", "abcabcabcabc"
        return True
    return any(len(w) >= 7 and not re.search(r"[aeiouy]", w) for w in _words(text))


def value_text(value: dict[str, Any] | None, labels: Mapping[str, str]) -> str | None:
    """What a value reads as in English: its text, or its item's label."""
    if not value:
        return None
    if "text" in value:
        return str(value["text"])
    if "id" in value:
        return labels.get(value["id"])
    if value.get("type") in ("string", "monolingualtext"):
        return str(value.get("value", ""))
    return None


# --------------------------------------------------------------------------- accounts


def mass_change_users(refs: Iterable[RevisionRef], users: Mapping[str, Mapping[str, Any]],
                      config: FilterConfig) -> dict[str, str]:
    """{user: reason} for new accounts with many revisions in the window.

    `users` is `users_info` output (editcount, registration); unknown users are not judged."""
    refs = list(refs)
    counts = Counter(r.user for r in refs if r.user and not r.is_anon)
    first_edit: dict[str, str] = {}
    for r in refs:
        first_edit.setdefault(r.user, r.timestamp)
        first_edit[r.user] = min(first_edit[r.user], r.timestamp)
    out = {}
    for user, n in counts.items():
        if n < config.mass_change_min_revisions or user not in users:
            continue
        info = users[user]
        new_by_count = info.get("editcount") is not None and int(info["editcount"]) <= config.new_account_max_edits
        reg = info.get("registration")
        new_by_age = bool(reg) and (parse_ts(first_edit[user]) - parse_ts(reg)) <= timedelta(
            days=config.new_account_max_age_days)
        if new_by_count or new_by_age:
            out[user] = f"mass change by new account {user} ({n} revisions in the window)"
    return out


def candidate_mass_users(refs: Iterable[RevisionRef], config: FilterConfig) -> list[str]:
    """Users worth an account look-up: registered ones over the revision threshold."""
    counts = Counter(r.user for r in refs if r.user and not r.is_anon)
    return sorted(u for u, n in counts.items() if n >= config.mass_change_min_revisions)


# --------------------------------------------------------------------------- changes


def change_verdict(change: FactChange, ref: RevisionRef | None, config: FilterConfig, labels: Mapping[str, str],
                   suspicious_users: Mapping[str, str] | None = None) -> Verdict:
    """Accept, filter (with the reason) or quarantine one fact change."""
    new, old = change.new_value, change.old_value
    for v in (new, old):
        if v and v.get("type") == "unsupported":
            return _filtered(f"unsupported value ({v.get('error') or v.get('datatype')})")
    # Quarantine before other filters: a vandal edit should be seen by a human even when it
    # would also fail a label check.
    new_text = value_text(new, labels)
    old_text = value_text(old, labels)
    if new_text:
        if is_profane(new_text, config) and not (old_text and is_profane(old_text, config)):
            return Verdict("quarantined", f"value replaced with profanity: {new_text[:40]!r}")
        if config.quarantine_nonsense and is_nonsense(new_text) and not (old_text and is_nonsense(old_text)):
            return Verdict("quarantined", f"value looks like nonsense: {new_text[:40]!r}")
    if ref is not None and suspicious_users and ref.user in suspicious_users:
        return Verdict("quarantined", suspicious_users[ref.user])
    if config.english_text_only and new and new.get("type") == "monolingualtext" \
            and not str(new.get("language", "")).startswith("en"):
        return _filtered(f"monolingual text not in English ({new.get('language')})")
    if config.require_english_labels:
        if change.subject not in labels:
            return _filtered(f"no English label for subject {change.subject}")
        for side, v in (("new", new), ("old", old)):
            if v and "id" in v and v["id"] not in labels:
                return _filtered(f"no English label for {side} value {v['id']}")
    if new_text is not None and len(new_text) > config.max_value_chars:
        return _filtered(f"value too long for a QA answer ({len(new_text)} > {config.max_value_chars} chars)")
    if new and new.get("type") not in ("wikibase-item",) and "value" in new \
            and len(str(new["value"])) > config.max_value_chars:
        return _filtered(f"value too long for a QA answer ({len(str(new['value']))} > {config.max_value_chars} chars)")
    return ACCEPT


class RevertTracker:
    """Spots content reverts in a stream of changes: X->Y followed within the settle window by
    Y->X on the same fact. Stateful so ingestion can feed it batch by batch."""

    def __init__(self, config: FilterConfig):
        self.window = timedelta(hours=config.settle_hours)
        self.hours = config.settle_hours
        self._last: dict[tuple[str, str, str], FactChange] = {}

    def observe(self, c: FactChange) -> tuple[FactChange, str, str] | None:
        """(the earlier change, reason for it, reason for this one) when `c` undoes it."""
        back = (c.subject, c.property, value_key(c.new_value) + "->" + value_key(c.old_value))
        prior = self._last.get(back)
        if prior is not None and parse_ts(c.timestamp) - parse_ts(prior.timestamp) <= self.window:
            del self._last[back]
            return (prior, f"undone within {self.hours:g}h by revision {c.revid}",
                    f"restores the state before revision {prior.revid} (a revert)")
        self._last[(c.subject, c.property, value_key(c.old_value) + "->" + value_key(c.new_value))] = c
        return None


def content_reverts(changes: Iterable[FactChange], config: FilterConfig) -> dict[str, str]:
    """{change_id: reason} for X->Y later undone by Y->X on the same fact within the window."""
    tracker = RevertTracker(config)
    out: dict[str, str] = {}
    for c in sorted(changes, key=lambda c: (c.timestamp, c.revid)):
        hit = tracker.observe(c)
        if hit:
            prior, why_prior, why_this = hit
            out[prior.change_id] = why_prior
            out[c.change_id] = why_this
    return out
