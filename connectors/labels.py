"""English labels for question generation and filters: DuckDB first, the API only for ids
never asked before (a missing label is cached too, so it is not asked again every night)."""
from __future__ import annotations

import logging
from datetime import timedelta

from connectors.wikidata import WikidataClient
from storage import wikidata_store
from storage.db import Database

log = logging.getLogger(__name__)


class CachedLabelLookup:
    """`LabelLookup` backed by the `entity_labels` table and `WikidataClient.labels`."""

    def __init__(self, client: WikidataClient | None, db: Database, lang: str = "en",
                 max_age: timedelta | None = None):
        self.client, self.db, self.lang, self.max_age = client, db, lang, max_age
        self.api_lookups = 0  # ids asked from the API (for reports and tests)

    def remember(self, labels: dict[str, str | None]) -> None:
        """Seed the cache with labels already at hand (e.g. from entity bodies just fetched)."""
        wikidata_store.put_labels(self.db, [(i, lab, None, ()) for i, lab in labels.items()], self.lang)

    def __call__(self, ids: list[str]) -> dict[str, str]:
        wanted = sorted({i for i in ids if i})
        known = wikidata_store.get_labels(self.db, wanted, self.lang, self.max_age)
        unknown = [i for i in wanted if i not in known]
        if unknown and self.client is not None:
            fetched = self.client.labels(unknown, lang=self.lang)
            self.api_lookups += len(unknown)
            rows = []
            for i in unknown:
                lab = fetched.get(i)
                rows.append((i, lab.label if lab else None, lab.description if lab else None,
                             lab.aliases if lab else ()))
                known[i] = lab.label if lab else None
            wikidata_store.put_labels(self.db, rows, self.lang)
        elif unknown:
            log.debug("no client: %d ids without a cached label", len(unknown))
        return {i: lab for i, lab in known.items() if lab}
