"""How the domain asks for English names of Wikidata entities, without knowing where they come
from: a `LabelLookup` is any callable `(ids) -> {id: label}` that leaves out ids it has no
English label for. `flows.services.labels.CachedLabelLookup` is the DuckDB-cached API one;
`StaticLabels` serves a dict (tests, recorded data)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable


@runtime_checkable
class LabelLookup(Protocol):
    def __call__(self, ids: list[str]) -> dict[str, str]: ...


class StaticLabels:
    """A LabelLookup over a fixed mapping."""

    def __init__(self, labels: Mapping[str, str]):
        self.labels = dict(labels)

    def __call__(self, ids: list[str]) -> dict[str, str]:
        return {i: self.labels[i] for i in ids if self.labels.get(i)}
