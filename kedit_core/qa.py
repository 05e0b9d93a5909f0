"""From fact changes to edit cases: the question, the answers and the probes that test them.

`build_cases(changes, labels, facts, config)` reads top to bottom:

1. collect every entity id whose English label is needed and look them all up at once;
2. per change, apply the quality filters (each drop is recorded with a reason code);
3. render the new (and old) answer per datatype (`kedit_core.render`), and the other
   renderings a reply may use (`meta["aliases"]` / `meta["old_aliases"]`: item aliases,
   number and date forms);
4. take the property's template (`kedit_core.templates`; label fallback otherwise) and
   write the edit's cloze prompt (subject verbatim, answer follows) and its question;
5. attach probes: paraphrases (the template's questions; the edit itself trains only on
   the cloze), locality of other subjects and of the same subject (from `SubjectFacts`,
   the current claims of entities we hold), negation (PP/PN "Is it true that ...?") and
   multi-hop questions through the new object when its own facts are known.

No remote model writes questions: wording comes from the template table alone.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

from kedit_core.render import Unrenderable, ids_needed, prune_aliases, render_value, value_aliases
from kedit_core.templates import PropertyTemplate, template_for
from kedit_core.types import EditCase, FactChange, Probe

# (list of entity ids) -> {id: English label}; ids without a label are simply absent.
LabelLookup = Callable[[list[str]], dict[str, str]]
# (list of item ids) -> {id: [aliases in the label's language]}; ids without aliases may be
# absent. Optional: `build_cases` takes one as `aliases=`, or uses the label lookup's own
# `aliases` method when it has one (`flows.services.labels.CachedLabelLookup`, `dict_labels`).
AliasLookup = Callable[[list[str]], dict[str, list[str]]]

# Wikimedia-internal items: not facts about the world (P31 values).
META_CLASSES = {
    "Q4167410": "disambiguation page",
    "Q4167836": "Wikimedia category",
    "Q11266439": "Wikimedia template",
    "Q13406463": "Wikimedia list article",
    "Q17442446": "Wikimedia internal item",
    "Q15184295": "Wikimedia module",
    "Q14204246": "Wikimedia project page",
}
META_PREFIXES = ("Category:", "Template:", "Wikipedia:", "Portal:", "Help:", "Module:", "List of ")

# Datatypes that are identifiers or media, not facts a person would ask a model about.
EXCLUDED_DATATYPES = (
    "external-id", "url", "commonsMedia", "geo-shape", "tabular-data", "math", "musical-notation",
    "entity-schema", "wikibase-lexeme", "wikibase-form", "wikibase-sense", "wikibase-property",
)


def dict_labels(table: Mapping[str, str], aliases: Mapping[str, list[str]] | None = None) -> LabelLookup:
    """A `LabelLookup` backed by a dict (tests, and labels already at hand); `aliases`
    (id -> aliases) are served by its `aliases` method."""

    def lookup(ids: list[str]) -> dict[str, str]:
        return {i: table[i] for i in ids if i in table}

    alias_table = dict(aliases or {})

    def alias_lookup(ids: list[str]) -> dict[str, list[str]]:
        return {i: list(alias_table[i]) for i in ids if alias_table.get(i)}

    lookup.aliases = alias_lookup  # type: ignore[attr-defined]
    return lookup


@dataclass
class QAConfig:
    max_answer_chars: int = 80
    max_answer_words: int = 12
    max_locality_other: int = 3
    max_locality_same: int = 3
    max_multihop: int = 2
    use_fallback: bool = True  # properties outside the table: generic questions from the label
    # Plain strings of properties without a template are almost always identifiers
    # (2015-era external ids were typed "string"): drop them unless asked.
    allow_untemplated_strings: bool = False
    excluded_datatypes: tuple[str, ...] = EXCLUDED_DATATYPES
    negation: bool = True


@dataclass(frozen=True)
class DroppedChange:
    change_id: str
    subject: str
    property: str
    kind: str
    reason: str  # short code, e.g. "removed", "multi_valued_update", "answer_in_question"
    detail: str = ""


@dataclass
class CaseBuildReport:
    cases: list[EditCase] = field(default_factory=list)
    dropped: list[DroppedChange] = field(default_factory=list)
    specific_template: int = 0  # cases whose property has its own template
    fallback_template: int = 0  # cases written from the property label

    def reasons(self) -> Counter:
        return Counter(d.reason for d in self.dropped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": [c.to_dict() for c in self.cases],
            "dropped": [asdict(d) for d in self.dropped],
            "specific_template": self.specific_template,
            "fallback_template": self.fallback_template,
        }


class SubjectFacts:
    """Current facts of the entities at hand: id -> property -> [normalised values], plus
    the labels those entity JSONs carry. Feeds locality and multi-hop probes."""

    def __init__(self, facts: Mapping[str, Mapping[str, list[dict[str, Any]]]] | None = None,
                 labels: Mapping[str, str] | None = None, aliases: Mapping[str, list[str]] | None = None):
        self.facts: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {p: list(v) for p, v in props.items()} for s, props in (facts or {}).items()
        }
        self.labels: dict[str, str] = dict(labels or {})
        # English aliases (the label's language) of the entities added from their JSON.
        self.aliases: dict[str, list[str]] = {k: list(v) for k, v in (aliases or {}).items()}

    @classmethod
    def from_entities(cls, entities: Iterable[Any]) -> SubjectFacts:
        sf = cls()
        for e in entities:
            sf.add_entity(e)
        return sf

    def add_entity(self, entity: Any) -> str | None:
        """Add one entity JSON (any shape `kedit_core.diff.parse_entity` reads); returns its id."""
        # The diff already knows Wikidata's truthy view (ranks, end dates): reuse it by
        # diffing the entity against nothing, which lists every current statement.
        from kedit_core.diff import diff_entities, english_label, parse_entity

        parsed = parse_entity(entity)
        if parsed is None or not parsed.get("id"):
            return None
        eid = str(parsed["id"])
        props: dict[str, list[dict[str, Any]]] = {}
        for ch in diff_entities(None, parsed):
            if ch.new_value is not None:
                props.setdefault(ch.property, []).append(ch.new_value)
        self.facts[eid] = props
        label = english_label(parsed)
        if label:
            self.labels[eid] = label
            self.aliases[eid] = _label_language_aliases(parsed, label)
        return eid

    def values(self, subject: str, pid: str) -> list[dict[str, Any]]:
        return self.facts.get(subject, {}).get(pid, [])

    def properties(self, subject: str) -> list[str]:
        return sorted(self.facts.get(subject, {}), key=lambda p: int(p[1:]) if p[1:].isdigit() else 0)

    def subjects_with(self, pid: str) -> list[str]:
        return sorted(s for s, props in self.facts.items() if props.get(pid))

    def all_ids(self) -> set[str]:
        out = set(self.facts)
        for props in self.facts.values():
            for pid, vals in props.items():
                out.add(pid)
                for v in vals:
                    out.update(ids_needed(v))
        return out


# ---------------------------------------------------------------------------- helpers


def _label_language_aliases(entity: Mapping[str, Any], label: str) -> list[str]:
    """The entity's aliases in the language its English label was taken from ("en", else
    the en-* variant `english_label` chose)."""
    labels = entity.get("labels") or {}
    aliases = entity.get("aliases") or {}
    if not isinstance(labels, dict) or not isinstance(aliases, dict):
        return []
    for lang in ["en"] + sorted(k for k in labels if k.startswith("en-")):
        if (labels.get(lang) or {}).get("value") == label:
            return [str(a["value"]) for a in aliases.get(lang) or []
                    if isinstance(a, dict) and isinstance(a.get("value"), str) and a["value"].strip()]
    return []


def _item_ids(values: Iterable[dict[str, Any] | None]) -> set[str]:
    """Ids of the item values among `values` (whose aliases a reply may use)."""
    return {i for v in values if v and v.get("type") in ("wikibase-item", "wikibase-entityid")
            for i in ids_needed(v)}


def _mentions(text: str, answer: str) -> bool:
    """Does `answer` occur in `text` as whole words (case-insensitive)?"""
    a = answer.strip()
    if not a:
        return False
    return re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def _sentence(template: PropertyTemplate, form: str, subject: str) -> str:
    """A filled cloze usable inside "Is it true that ...": lower-case its first word
    unless the sentence starts with the subject (a name keeps its capital)."""
    text = template.fill(form, subject)
    if form.startswith("{subject}"):
        return text
    return text[:1].lower() + text[1:]


def _meta_subject(subject_id: str, label: str, facts: SubjectFacts | None) -> str | None:
    if label.startswith(META_PREFIXES) or label.endswith("(disambiguation)"):
        return f"label {label!r}"
    if facts is not None:
        for v in facts.values(subject_id, "P31"):
            if v.get("id") in META_CLASSES:
                return f"instance of {META_CLASSES[v['id']]}"
    return None


def _render(value: dict[str, Any] | None, labels: dict[str, str]) -> str:
    return render_value(value, labels)


def _sortable_time(t: str) -> str:
    """"+2017-12-31T.." -> a string that sorts by date (BCE first, years zero-padded)."""
    m = re.match(r"([+-])0*(\d+)-(\d{2})-(\d{2})", t)
    if not m:
        return ""
    year = int(m.group(2)) * (-1 if m.group(1) == "-" else 1)
    return f"{year + 10**11:012d}-{m.group(3)}-{m.group(4)}"


def _fits(answer: str, cfg: QAConfig) -> bool:
    return len(answer) <= cfg.max_answer_chars and len(answer.split()) <= cfg.max_answer_words


# ---------------------------------------------------------------------------- the build


def fact_key(subject_id: str, pid: str, new_value: dict[str, Any] | None) -> tuple[str, ...]:
    """Which fact a change (or the case made from it) sets: a later one with the same key
    replaces it. For a multi-valued relation each value is its own fact (five occupations
    are five facts), so only a single-valued relation is keyed by (subject, property)."""
    t = template_for(pid)
    if t is not None and t.single_valued:
        return (subject_id, pid)
    return (subject_id, pid, json.dumps(new_value, sort_keys=True, default=str))


def build_cases(
    changes: list[FactChange],
    labels: LabelLookup,
    facts: SubjectFacts | None = None,
    config: QAConfig | None = None,
    aliases: AliasLookup | None = None,
) -> CaseBuildReport:
    """Edit cases for the changes that pass the quality filters; the rest are in `dropped`.

    Item aliases come from `facts` (entities at hand) and else from `aliases`, or the label
    lookup's `aliases` method when `aliases` is not given; without either, items get no
    aliases (numbers and dates still do)."""
    cfg = config or QAConfig()
    report = CaseBuildReport()
    known = _lookup_labels(changes, labels, facts)
    known_aliases = _lookup_aliases(changes, labels, facts, aliases)
    latest = _latest_per_fact(changes)
    changed_facts = {(ch.subject, ch.property) for ch in changes}

    for i, ch in enumerate(changes):
        try:
            datatype, subject = _check_fact(ch, latest[_fact_of(ch)] == i, known, facts, cfg)
            new_answer, old_answer = _answers(ch, known, cfg)
            template, prompt, questions = _wording(ch, subject, datatype, new_answer, known, cfg)
        except _Drop as d:
            report.dropped.append(DroppedChange(ch.change_id, ch.subject, ch.property, ch.kind, d.reason, d.detail))
            continue
        new_aliases, old_aliases = _answer_aliases(ch, new_answer, old_answer, [prompt, *questions],
                                                   known, known_aliases)
        probes = [Probe("paraphrase", q, new_answer, {"template": template.pid}) for q in questions]
        if cfg.negation:
            probes += _negation_probes(template, subject, new_answer, old_answer)
        if facts is not None:
            probes += _locality_other(ch, template, facts, known, changed_facts, cfg)
            probes += _locality_same(ch, facts, known, changed_facts, cfg)
            probes += _multihop(ch, template, subject, facts, known, cfg, known_aliases)
        report.cases.append(_edit_case(ch, subject, template, prompt, questions[0], new_answer, old_answer,
                                       probes, new_aliases, old_aliases))
        if template.specific:
            report.specific_template += 1
        else:
            report.fallback_template += 1
    return report


class _Drop(Exception):
    """A change fails a quality filter; `build_cases` records it as a `DroppedChange`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _lookup_labels(changes: list[FactChange], labels: LabelLookup, facts: SubjectFacts | None) -> dict[str, str]:
    """One label lookup for everything: subjects, values, units, property labels (for the
    fallback), and whatever the locality / multi-hop facts mention."""
    wanted: set[str] = set()
    for ch in changes:
        wanted.update({ch.subject, ch.property})
        wanted.update(ids_needed(ch.new_value))
        wanted.update(ids_needed(ch.old_value))
    if facts is not None:
        wanted |= facts.all_ids()
    known = dict(facts.labels) if facts is not None else {}
    missing = sorted(i for i in wanted if i not in known)
    if missing:
        known.update({k: v for k, v in (labels(missing) or {}).items() if v})
    return known


def _lookup_aliases(changes: list[FactChange], labels: LabelLookup, facts: SubjectFacts | None,
                    aliases: AliasLookup | None) -> dict[str, list[str]]:
    """One alias lookup for the item values a case or a multi-hop probe answers with
    (entities in `facts` bring their own aliases)."""
    alias_lookup = aliases if aliases is not None else getattr(labels, "aliases", None)
    alias_ids = _item_ids(v for ch in changes for v in (ch.new_value, ch.old_value))
    if facts is not None:
        hop_objects = {(ch.new_value or {}).get("id") for ch in changes} & set(facts.facts)
        alias_ids |= _item_ids(v for obj in hop_objects for vals in facts.facts[obj].values() for v in vals)
    known_aliases: dict[str, list[str]] = dict(facts.aliases) if facts is not None else {}
    alias_missing = sorted(i for i in alias_ids if i not in known_aliases)
    if alias_missing and callable(alias_lookup):
        known_aliases.update({k: list(v) for k, v in (alias_lookup(alias_missing) or {}).items() if v})
    return known_aliases


def _fact_of(ch: FactChange) -> tuple[str, ...]:
    return fact_key(ch.subject, ch.property, ch.new_value)


def _recency(changes: list[FactChange], i: int) -> tuple[int, str, int]:
    """Among values of one single-valued fact in the same revision (e.g. populations with
    different "point in time" qualifiers), the most recent one by qualifier wins."""
    ch = changes[i]
    quals = ch.qualifiers or {}
    when = ""
    for qp in ("P585", "P580"):
        vals = quals.get(qp) or []
        if vals and isinstance(vals[0], dict) and isinstance(vals[0].get("time"), str):
            when = _sortable_time(vals[0]["time"])
            break
    return (ch.revid, when, i)


def _latest_per_fact(changes: list[FactChange]) -> dict[tuple[str, ...], int]:
    """Index of the change that sets each fact: a later change of the same fact in the
    batch supersedes an earlier one."""
    last_index: dict[tuple[str, ...], int] = {}
    for i, ch in enumerate(changes):
        key = _fact_of(ch)
        if key not in last_index or _recency(changes, i) > _recency(changes, last_index[key]):
            last_index[key] = i
    return last_index


def _check_fact(ch: FactChange, is_latest: bool, known: dict[str, str], facts: SubjectFacts | None,
                cfg: QAConfig) -> tuple[str | None, str]:
    """The filters that need no wording; returns the change's datatype and subject label."""
    if ch.kind == "removed" or ch.new_value is None:
        raise _Drop("removed", "a removed statement states no new fact to teach")
    if not is_latest:
        raise _Drop("superseded", "a later change (or a more recent value) of the same fact is in this batch")
    datatype = ch.datatype or ch.new_value.get("type")
    if datatype in cfg.excluded_datatypes:
        raise _Drop("datatype_excluded", f"{datatype} values are identifiers or media, not QA facts")
    subject = known.get(ch.subject)
    if not subject:
        raise _Drop("subject_unlabelled", f"{ch.subject} has no English label")
    why_meta = _meta_subject(ch.subject, subject, facts)
    if why_meta:
        raise _Drop("meta_subject", why_meta)
    return datatype, subject


def _answers(ch: FactChange, known: dict[str, str], cfg: QAConfig) -> tuple[str, str | None]:
    """The new answer (and the old one, for an update), rendered and checked."""
    try:
        new_answer = _render(ch.new_value, known)
    except Unrenderable as exc:
        raise _Drop(f"new_value_{exc.reason}", exc.detail) from None
    old_answer: str | None = None
    if ch.kind == "updated" and ch.old_value is not None:
        try:
            old_answer = _render(ch.old_value, known)
        except Unrenderable:
            old_answer = None  # an unknown old value still allows teaching the new one
    if old_answer is not None and old_answer == new_answer:
        raise _Drop("unchanged_answer", f"old and new both read {new_answer!r}")
    if new_answer.startswith(META_PREFIXES):
        raise _Drop("meta_value", f"value {new_answer!r} is a Wikimedia page, not a fact")
    if not _fits(new_answer, cfg):
        raise _Drop("answer_too_long", f"{len(new_answer)} chars / {len(new_answer.split())} words")
    if ch.new_value.get("id") == ch.subject:
        raise _Drop("self_reference", "the value is the subject itself")
    return new_answer, old_answer


def _wording(ch: FactChange, subject: str, datatype: str | None, new_answer: str, known: dict[str, str],
             cfg: QAConfig) -> tuple[PropertyTemplate, str, list[str]]:
    """The property's template, the edit's cloze prompt and its questions."""
    template = template_for(ch.property, known.get(ch.property) if cfg.use_fallback else None, datatype)
    if template is None:
        raise _Drop("no_template", f"{ch.property} has no template and no English label")
    if not template.specific and datatype == "string" and not cfg.allow_untemplated_strings:
        raise _Drop("identifier_like", f"string value of {ch.property} ({template.label}) without a template")
    if ch.kind == "updated" and not template.single_valued:
        raise _Drop("multi_valued_update",
                    f"{template.label} is multi-valued: the old value may still hold, so this is no replacement")
    prompt = template.prompt(subject)
    questions = template.question_forms(subject)
    if subject not in prompt or any(subject not in q for q in questions):
        raise _Drop("subject_not_in_question", prompt)
    if _mentions(prompt, new_answer) or any(_mentions(q, new_answer) for q in questions):
        raise _Drop("answer_in_question", f"{new_answer!r} occurs in {prompt!r}")
    return template, prompt, questions


def _answer_aliases(ch: FactChange, new_answer: str, old_answer: str | None, asked: list[str],
                    known: dict[str, str], known_aliases: Mapping[str, list[str]]) -> tuple[list[str], list[str]]:
    """Other renderings of the new and old answers a free reply may use."""
    new_aliases, old_aliases = prune_aliases(
        new_answer, value_aliases(ch.new_value, known, known_aliases),
        old_answer, value_aliases(ch.old_value, known, known_aliases) if old_answer is not None else [])
    # An alias the question itself says would be "stated" by a reply that repeats the question.
    new_aliases = [a for a in new_aliases if not any(_mentions(q, a) for q in asked)]
    return new_aliases, old_aliases


def _edit_case(ch: FactChange, subject: str, template: PropertyTemplate, prompt: str, question: str,
               new_answer: str, old_answer: str | None, probes: list[Probe], new_aliases: list[str],
               old_aliases: list[str]) -> EditCase:
    return EditCase(
        case_id=f"wd-{ch.change_id}",
        subject=subject,
        relation=ch.property,
        prompt=prompt,
        question=question,
        target_new=new_answer,
        target_old=old_answer,
        probes=probes,
        source="wikidata",
        change_id=ch.change_id,
        meta={
            "subject_id": ch.subject,
            "kind": ch.kind,
            "revid": ch.revid,
            "timestamp": ch.timestamp,
            "template": "specific" if template.specific else "fallback",
            "relation_label": template.label,
            "new_value": ch.new_value,
            "old_value": ch.old_value,
            # other renderings of the answers a free reply may use (served answers)
            "aliases": new_aliases,
            "old_aliases": old_aliases,
        },
    )


def _negation_probes(t: PropertyTemplate, subject: str, new: str, old: str | None) -> list[Probe]:
    """PP/PN: the new statement must be affirmed, its negation and the old statement denied."""
    probes = [
        Probe("negation", f"Is it true that {_sentence(t, t.cloze, subject)} {new}?", "Yes", {"polarity": "new"}),
        Probe("negation", f"Is it true that {_sentence(t, t.negation, subject)} {new}?", "No",
              {"polarity": "new_negated"}),
    ]
    if old is not None and t.single_valued:
        probes.append(
            Probe("negation", f"Is it true that {_sentence(t, t.cloze, subject)} {old}?", "No", {"polarity": "old"})
        )
    return probes


def _answer_for(values: list[dict[str, Any]], known: dict[str, str], cfg: QAConfig) -> str | None:
    """A locality/multi-hop answer: only a single current value (several would make the
    expected answer ambiguous), rendered and short."""
    if len(values) != 1:
        return None
    try:
        text = render_value(values[0], known)
    except Unrenderable:
        return None
    return text if _fits(text, cfg) else None


def _locality_other(ch: FactChange, t: PropertyTemplate, facts: SubjectFacts, known: dict[str, str],
                    changed: set[tuple[str, str]], cfg: QAConfig) -> list[Probe]:
    out: list[Probe] = []
    for other in facts.subjects_with(ch.property):
        if len(out) >= cfg.max_locality_other:
            break
        if other == ch.subject or (other, ch.property) in changed or other not in known:
            continue
        ans = _answer_for(facts.values(other, ch.property), known, cfg)
        if ans is None:
            continue
        q = t.prompt(known[other])  # cloze: see _locality_same for why
        if _mentions(q, ans):
            continue
        out.append(Probe("locality_other", q, ans, {"subject_id": other, "property": ch.property}))
    return out


def _locality_same(ch: FactChange, facts: SubjectFacts, known: dict[str, str], changed: set[tuple[str, str]],
                   cfg: QAConfig) -> list[Probe]:
    out: list[Probe] = []
    subject = known[ch.subject]
    for pid in facts.properties(ch.subject):
        if len(out) >= cfg.max_locality_same:
            break
        if pid == ch.property or (ch.subject, pid) in changed or pid == "P31":
            continue
        t = template_for(pid)  # only properties with their own template: fallback wording is weaker
        if t is None:
            continue
        ans = _answer_for(facts.values(ch.subject, pid), known, cfg)
        if ans is None:
            continue
        # Cloze, not a question: locality is token agreement with the unedited model on the
        # answer, and a bare question ("When was X born?") makes the base model predict
        # end-of-turn tokens there, so the probe would measure noise, not kept knowledge.
        q = t.prompt(subject)
        if _mentions(q, ans):
            continue
        out.append(Probe("locality_same", q, ans, {"subject_id": ch.subject, "property": pid}))
    return out


def _multihop(ch: FactChange, t1: PropertyTemplate, subject: str, facts: SubjectFacts, known: dict[str, str],
              cfg: QAConfig, known_aliases: Mapping[str, list[str]] | None = None) -> list[Probe]:
    """Two hops through the new object: "Who is the head of government of the capital of X?"."""
    obj = (ch.new_value or {}).get("id")
    if not obj or ch.new_value.get("type") != "wikibase-item" or obj not in facts.facts:
        return []
    if not t1.single_valued:  # "the notable work of X" names no single object to hop through
        return []
    via = t1.object_phrase(subject)
    out: list[Probe] = []
    for pid in facts.properties(obj):
        if len(out) >= cfg.max_multihop:
            break
        t2 = template_for(pid)
        if t2 is None or pid == "P31":
            continue
        ans = _answer_for(facts.values(obj, pid), known, cfg)
        if ans is None or ans == subject:
            continue
        # Prefer a question of the "... of {subject}" shape: "the capital of X's mayor" reads badly.
        forms = [q for q in t2.questions if "{subject}'s" not in q] or list(t2.questions)
        q = t2.fill(forms[0], via)
        if _mentions(q, ans):
            continue
        hop_aliases, _ = prune_aliases(ans, value_aliases(facts.values(obj, pid)[0], known, known_aliases or {}))
        hop_aliases = [a for a in hop_aliases if not _mentions(q, a)]
        out.append(Probe("multihop", q, ans, {"hops": [ch.property, pid], "via": known.get(obj, obj),
                                              "aliases": hop_aliases}))
    return out
