"""A reference to one Wikidata revision, as the connector sees it in recent changes,
revision history or a dump. Plain data, so filters in `kedit_core` can reason about
revisions without importing the connector."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kedit_core.types import FactChange


@dataclass(frozen=True)
class RevisionRef:
    item: str  # Q-id (page title in namespace 0)
    revid: int
    old_revid: int  # 0 for a page creation
    timestamp: str  # ISO 8601 UTC, e.g. "2024-05-01T12:00:00Z"
    user: str = ""
    is_bot: bool = False
    is_anon: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)
    comment: str = ""
    kind: str = "edit"  # edit | new

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RevisionRef:
        d = dict(d)
        d["tags"] = tuple(d.get("tags") or ())
        return cls(**d)


@dataclass
class RevisionOutcome:
    """What became of one revision: its status and the verdict on each of its changes."""

    ref: RevisionRef
    status: str  # diffed | filtered | failed
    reason: str | None = None
    changes: list[tuple[FactChange, str, str | None]] = field(default_factory=list)  # (change, status, reason)
