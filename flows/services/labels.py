"""English labels for question generation and filters: memory, then DuckDB, then the API only
for ids never asked before (a missing label is cached too, so it is not asked every night)."""
from __future__ import annotations

import json
import logging
from datetime import timedelta

from connectors.wikidata import WikidataClient
from storage import wikidata_store
from storage.db import Database

log = logging.getLogger(__name__)

LabelRow = tuple[str, "str | None", "str | None", tuple[str, ...]]


class CachedLabelLookup:
    """`kedit_core.labels.LabelLookup` backed by the `entity_labels` table and `WikidataClient.labels`."""

    def __init__(self, client: WikidataClient | None, db: Database | None, lang: str = "en",
                 max_age: timedelta | None = None):
        # `db` None or read-only (`kedit cases`, an inspection): labels are read from the
        # cache where there is one and never written back.
        self.client, self.db, self.lang, self.max_age = client, db, lang, max_age
        self.persist = db is not None and not db.read_only
        self.api_lookups = 0  # ids asked from the API (for reports and tests)
        self._mem: dict[str, str | None] = {}
        self._alias_mem: dict[str, tuple[str, ...]] = {}
        self._pending: list[LabelRow] = []

    def remember(self, labels: dict[str, str | None]) -> None:
        """Labels already at hand (e.g. from entity bodies just fetched). They are written with the
        next ingestion batch (`drain`) or by `flush()`."""
        for i, lab in labels.items():
            if self._mem.get(i, "\0") != lab:
                self._mem[i] = lab
                self._pending.append((i, lab, None, ()))

    def drain(self) -> list[LabelRow]:
        rows, self._pending = self._pending, []
        return rows

    def flush(self) -> None:
        rows = self.drain()
        if self.persist:
            wikidata_store.put_labels(self.db, rows, self.lang)

    def __call__(self, ids: list[str]) -> dict[str, str]:
        wanted = sorted({i for i in ids if i})
        unknown = [i for i in wanted if i not in self._mem]
        if unknown and self.db is not None:
            self._mem.update(wikidata_store.get_labels(self.db, unknown, self.lang, self.max_age))
            unknown = [i for i in unknown if i not in self._mem]
        if unknown and self.client is not None:
            fetched = self.client.labels(unknown, lang=self.lang)
            self.api_lookups += len(unknown)
            rows = []
            for i in unknown:
                lab = fetched.get(i)
                rows.append((i, lab.label if lab else None, lab.description if lab else None,
                             lab.aliases if lab else ()))
                self._mem[i] = lab.label if lab else None
                self._alias_mem[i] = tuple(lab.aliases) if lab else ()
            if self.persist:
                wikidata_store.put_labels(self.db, rows, self.lang)
        elif unknown:
            log.debug("no client: %d ids without a cached label", len(unknown))
        return {i: self._mem[i] for i in wanted if self._mem.get(i)}

    def aliases(self, ids: list[str]) -> dict[str, list[str]]:
        """Aliases (in `lang`) of ids whose label this lookup fetched, or that the cache holds with
        aliases; never asks the API (call the lookup for labels first: it fetches aliases too).
        Labels remembered from entity bodies carry none. Ids without aliases are absent."""
        wanted = sorted({i for i in ids if i})
        unknown = [i for i in wanted if i not in self._alias_mem]
        if unknown:
            if self.db is not None:
                self._alias_mem.update(_cached_aliases(self.db, unknown, self.lang, self.max_age))
            for i in unknown:
                self._alias_mem.setdefault(i, ())  # asked once per lookup object
        return {i: list(self._alias_mem[i]) for i in wanted if self._alias_mem.get(i)}


def _cached_aliases(db: Database, ids: list[str], lang: str, max_age: timedelta | None) -> dict[str, tuple[str, ...]]:
    """The `aliases` column (a JSON list) of cached labels: {id: aliases} for the ids it has."""
    sql = ("SELECT entity_id, aliases FROM entity_labels WHERE lang = ? AND label IS NOT NULL"
           " AND entity_id IN (SELECT unnest(?::TEXT[]))")
    params: list = [lang, ids]
    if max_age is not None:
        sql, params = sql + " AND fetched_at >= ?", params + [wikidata_store._utcnow() - max_age]
    out: dict[str, tuple[str, ...]] = {}
    with db.connect(read_only=True) as con:
        for eid, raw in con.execute(sql, params).fetchall():
            try:
                vals = json.loads(raw) if raw else []
            except (TypeError, ValueError):
                vals = []
            out[eid] = tuple(v for v in vals if isinstance(v, str) and v.strip()) if isinstance(vals, list) else ()
    return out
