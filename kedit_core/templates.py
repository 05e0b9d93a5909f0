"""Property -> question templates: one table (`data/property_templates.txt`), loaded at import.

Each `PropertyTemplate` gives, for one Wikidata property, the edit's cloze ("The capital of
{subject} is"), at least three differently worded questions, the negated cloze, whether
the relation is single-valued, the property's English label and aliases, and a noun phrase
naming the object ("the capital of {subject}") from which two-hop questions are built.
Properties missing from the table get a generic template from their own label
(`fallback_template`), marked `specific=False` so coverage can be measured.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

TABLE_PATH = Path(__file__).parent / "data" / "property_templates.txt"

_KIND_DATATYPE = {
    "i": "wikibase-item",
    "t": "time",
    "q": "quantity",
    "s": "string",
    "m": "monolingualtext",
}
_AUX = re.compile(r"\b(is|was|are|were)\b")


class TemplateTableError(ValueError):
    """A line of the template table is malformed (names the line)."""


@dataclass(frozen=True)
class PropertyTemplate:
    pid: str
    label: str
    cloze: str  # contains {subject}; the answer follows after one space
    questions: tuple[str, ...]  # each contains {subject}
    negation: str  # the cloze negated; contains {subject}
    single_valued: bool
    datatype: str  # wikibase-item, time, quantity, string, monolingualtext
    aliases: tuple[str, ...] = ()
    noun_phrase: str = ""  # names the object: "the capital of {subject}"
    specific: bool = True  # False for the generic fallback built from the label

    def fill(self, form: str, subject: str) -> str:
        # str.replace, not str.format: subject labels may contain braces.
        return form.replace("{subject}", subject)

    def prompt(self, subject: str) -> str:
        return self.fill(self.cloze, subject)

    def question_forms(self, subject: str) -> list[str]:
        return [self.fill(q, subject) for q in self.questions]

    def negated(self, subject: str) -> str:
        return self.fill(self.negation, subject)

    def object_phrase(self, subject: str) -> str:
        return self.fill(self.noun_phrase or f"the {self.label} of {{subject}}", subject)

    def statement(self, subject: str, answer: str) -> str:
        """The fact as a sentence: cloze + answer."""
        return f"{self.prompt(subject)} {answer}"


def negate_cloze(cloze: str) -> str | None:
    """Put "not" after the first auxiliary ("is" -> "is not"); None when there is none."""
    m = _AUX.search(cloze)
    if not m:
        return None
    return cloze[: m.end()] + " not" + cloze[m.end() :]


def _split_list(cell: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in cell.split(" ; ") if x.strip())


def parse_table(text: str, source: str = "table") -> dict[str, PropertyTemplate]:
    """Parse the table text; every malformed line raises `TemplateTableError` naming it."""
    out: dict[str, PropertyTemplate] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {lineno}"
        cells = re.split(r"\s*\|\s*", line)
        cells += [""] * (8 - len(cells))
        if len(cells) != 8:
            raise TemplateTableError(f"{where}: expected 8 columns separated by ' | ', got {len(cells)}")
        pid, kind, label, aliases, cloze, questions, negation, noun = cells
        if not re.fullmatch(r"P\d+", pid):
            raise TemplateTableError(f"{where}: bad property id {pid!r}")
        if pid in out:
            raise TemplateTableError(f"{where}: {pid} listed twice")
        if len(kind) != 2 or kind[0] not in _KIND_DATATYPE or kind[1] not in "1n":
            raise TemplateTableError(f"{where}: bad kind {kind!r} (e.g. i1, tn, q1)")
        qs = _split_list(questions)
        if "{subject}" not in cloze:
            raise TemplateTableError(f"{where}: cloze {cloze!r} lacks {{subject}}")
        if len(qs) < 3 or any("{subject}" not in q for q in qs):
            raise TemplateTableError(f"{where}: need at least three questions, each with {{subject}}")
        if len(set(qs)) != len(qs):
            raise TemplateTableError(f"{where}: repeated question")
        neg = negation or negate_cloze(cloze)
        if not neg or "{subject}" not in neg or " not" not in neg:
            raise TemplateTableError(f"{where}: cannot derive a negation from {cloze!r}; write it in column 7")
        if noun and "{subject}" not in noun:
            raise TemplateTableError(f"{where}: noun phrase {noun!r} lacks {{subject}}")
        out[pid] = PropertyTemplate(
            pid=pid,
            label=label,
            cloze=cloze,
            questions=qs,
            negation=neg,
            single_valued=kind[1] == "1",
            datatype=_KIND_DATATYPE[kind[0]],
            aliases=_split_list(aliases),
            noun_phrase=noun,
        )
    return out


@lru_cache(maxsize=1)
def templates() -> dict[str, PropertyTemplate]:
    """The shipped table, parsed once."""
    return parse_table(TABLE_PATH.read_text(encoding="utf-8"), source=str(TABLE_PATH))


def fallback_template(pid: str, label: str, datatype: str | None = None, aliases: Iterable[str] = ()) -> PropertyTemplate:
    """A generic template from the property's English label (and aliases, as extra questions).

    Treated as multi-valued: without knowing the property, an update must not be assumed
    to replace the old value.
    """
    label = label.strip()
    when = datatype == "time"
    questions = [
        f"What is the {label} of {{subject}}?",
        f"What is {{subject}}'s {label}?",
        (f"When is the {label} of {{subject}}?" if when else f"Which {label} does {{subject}} have?"),
    ]
    for alias in aliases:
        q = f"What is the {alias.strip()} of {{subject}}?"
        if alias.strip() and q not in questions:
            questions.append(q)
    return PropertyTemplate(
        pid=pid,
        label=label,
        cloze=f"The {label} of {{subject}} is",
        questions=tuple(questions),
        negation=f"The {label} of {{subject}} is not",
        single_valued=False,
        datatype=datatype or "unknown",
        aliases=tuple(aliases),
        specific=False,
    )


def template_for(pid: str, label: str | None = None, datatype: str | None = None) -> PropertyTemplate | None:
    """The table's template, else the label fallback, else None (no label known)."""
    t = templates().get(pid)
    if t is not None:
        return t
    if label and not re.fullmatch(r"[PQL]\d+", label):
        return fallback_template(pid, label, datatype)
    return None


@dataclass
class CoverageReport:
    """Share of fact changes (or statements) whose property has a specific template."""

    total: int = 0
    specific: int = 0
    by_property: Counter = field(default_factory=Counter)  # pid -> count
    uncovered: Counter = field(default_factory=Counter)  # pid -> count without template

    @property
    def share(self) -> float:
        return self.specific / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "specific": self.specific,
            "share_specific": round(self.share, 4),
            "top_uncovered": self.uncovered.most_common(15),
        }


def coverage(pids: Iterable[str]) -> CoverageReport:
    """Count how many of the given property ids (one per fact change) have a specific template."""
    table = templates()
    rep = CoverageReport()
    for pid in pids:
        rep.total += 1
        rep.by_property[pid] += 1
        if pid in table:
            rep.specific += 1
        else:
            rep.uncovered[pid] += 1
    return rep
