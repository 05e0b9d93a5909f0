"""The domain's data types, shared by every room.

`FactChange` is what the Wikidata diff produces; `EditCase` is what every editor and
evaluator consumes. Both are plain dataclasses that round-trip through JSON (and through
DuckDB, via `storage/`), so nothing downstream depends on where a case came from: a
Wikidata revision, zsRE, CounterFact or MQuAKE.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ChangeKind = Literal["added", "removed", "updated"]

# The kinds of probe a case carries. Editors only ever train on the case's own prompt;
# every probe is for evaluation.
ProbeKind = Literal[
    "paraphrase",  # the edited fact asked in other words (held out from the edit)
    "locality_other",  # an unrelated subject's fact with the same relation: must not change
    "locality_same",  # another fact of the same subject: must not change
    "locality",  # an unrelated prompt (benchmark datasets, e.g. zsRE's NQ question)
    "negation",  # "Is it true that ...?" with expected Yes/No (PP/PN protocol)
    "multihop",  # a two-hop question through the new object
    "portability",  # benchmark portability questions (KnowEdit)
]
PROBE_KINDS: tuple[str, ...] = (
    "paraphrase",
    "locality_other",
    "locality_same",
    "locality",
    "negation",
    "multihop",
    "portability",
)


@dataclass(frozen=True)
class FactChange:
    """One changed statement of one Wikidata item between two revisions.

    Values are already normalised per datatype (see `kedit_core.diff`): a dict such as
    {"type": "wikibase-item", "id": "Q5"} or {"type": "time", "time": "+2024-05-01T00:00:00Z",
    "precision": 11}; `None` means the statement did not exist on that side.
    """

    subject: str  # Q-id of the item
    property: str  # P-id
    old_value: dict[str, Any] | None
    new_value: dict[str, Any] | None
    kind: ChangeKind
    revid: int
    timestamp: str  # ISO 8601, UTC
    qualifiers: dict[str, Any] = field(default_factory=dict)
    old_revid: int | None = None
    datatype: str | None = None

    @property
    def change_id(self) -> str:
        """Stable id: the same change seen twice gets the same id (idempotent ingestion)."""
        payload = json.dumps(
            [self.subject, self.property, self.old_value, self.new_value, self.kind, self.revid],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FactChange:
        return cls(**d)


@dataclass(frozen=True)
class Probe:
    """One evaluation question attached to a case.

    `prompt` is asked; `answer` is the expected continuation (for negation probes
    "Yes" or "No"). For locality probes `answer` is what the unedited model should keep
    saying (dataset ground truth, or left empty to mean "whatever the base model says").
    """

    kind: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {self.kind!r}; expected one of {PROBE_KINDS}")


@dataclass
class EditCase:
    """One fact to put into the model, and the questions that define and test it.

    MEMIT/ROME need the subject's position in the prompt: `prompt` contains the subject
    verbatim and `subject` names it, so `prompt.index(subject)` marks the span (see
    `subject_span`). `prompt` is the edit's own wording (a cloze or a question); the
    answer follows it after one space.
    """

    case_id: str
    subject: str
    relation: str  # property id (P-id) or dataset relation name
    prompt: str  # the wording the editor trains on; contains `subject`
    target_new: str
    target_old: str | None = None
    question: str | None = None  # question form of the same fact (may equal prompt)
    probes: list[Probe] = field(default_factory=list)
    source: str = "unknown"  # "wikidata", "zsre", "counterfact", "mquake", ...
    change_id: str | None = None  # FactChange.change_id for Wikidata-derived cases
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.subject:
            raise ValueError(f"case {self.case_id}: empty subject")
        if not self.target_new or not self.target_new.strip():
            raise ValueError(f"case {self.case_id}: empty new answer")
        if self.subject not in self.prompt:
            raise ValueError(
                f"case {self.case_id}: subject {self.subject!r} does not occur in prompt {self.prompt!r}"
            )

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject in `prompt` (its last occurrence, as ROME uses)."""
        start = self.prompt.rindex(self.subject)
        return start, start + len(self.subject)

    def probes_of(self, kind: str) -> list[Probe]:
        return [p for p in self.probes if p.kind == kind]

    @property
    def fact_key(self) -> tuple[str, str]:
        """Two cases with the same key edit the same fact: the later one wins."""
        return (self.subject, self.relation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditCase:
        d = dict(d)
        d["probes"] = [Probe(**p) for p in d.get("probes", [])]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> EditCase:
        return cls.from_dict(json.loads(s))
