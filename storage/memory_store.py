"""Persisting memory editors' edit memories in the DuckDB `edit_memory` table.

One row per entry, the embedding in a FLOAT[] column. Writes are batched into one
statement per call (lists are passed as parameters and unnested by DuckDB), because a
row-by-row insert of 384-float vectors is slow at 100k entries. Loading reads the
vectors back flattened with `unnest` and `fetchnumpy`, so no per-float Python objects
are created. The table has no column for an entry's fact key (subject, relation); it is
recovered from `edit_cases` when the case was recorded there, else left unknown (such an
entry is then never superseded automatically).
"""
from __future__ import annotations

import numpy as np

from kedit_core.memory import MemoryEntry
from storage.db import Database
from storage.ledger import utcnow


class DuckDBMemoryStore:
    """`kedit_core.memory.MemoryStore` on the ledger file."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add_entries(self, memory_name: str, entries: list[MemoryEntry], vectors: np.ndarray) -> None:
        if not entries:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        now = utcnow()
        with self.db.connect() as con:
            con.execute(
                """INSERT INTO edit_memory (entry_id, memory_name, case_id, fact_text, key_text, vector, created, active)
                   SELECT unnest(?::TEXT[]), ?, unnest(?::TEXT[]), unnest(?::TEXT[]), unnest(?::TEXT[]),
                          unnest(?::FLOAT[][]), ?, unnest(?::BOOLEAN[])""",
                [
                    [e.entry_id for e in entries],
                    memory_name,
                    [e.case_id for e in entries],
                    [e.fact_text for e in entries],
                    [e.key_text for e in entries],
                    vectors.tolist(),
                    now,
                    [bool(e.active) for e in entries],
                ],
            )

    def set_active(self, memory_name: str, entry_ids: list[str], active: bool) -> None:
        if not entry_ids:
            return
        with self.db.connect() as con:
            con.execute(
                "UPDATE edit_memory SET active = ? WHERE memory_name = ? AND list_contains(?::TEXT[], entry_id)",
                [active, memory_name, list(entry_ids)],
            )

    def delete_entries(self, memory_name: str, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        with self.db.connect() as con:
            con.execute(
                "DELETE FROM edit_memory WHERE memory_name = ? AND list_contains(?::TEXT[], entry_id)",
                [memory_name, list(entry_ids)],
            )

    def clear(self, memory_name: str) -> None:
        with self.db.connect() as con:
            con.execute("DELETE FROM edit_memory WHERE memory_name = ?", [memory_name])

    def load(self, memory_name: str) -> tuple[list[MemoryEntry], np.ndarray]:
        """All entries of one memory in insertion order, with their vectors [N, dim]."""
        with self.db.connect(read_only=True) as con:
            rows = con.execute(
                """SELECT m.entry_id, m.case_id, m.fact_text, m.key_text, m.active, len(m.vector),
                          c.subject, c.relation
                   FROM edit_memory m LEFT JOIN edit_cases c ON c.case_id = m.case_id
                   WHERE m.memory_name = ? ORDER BY m.created, m.rowid""",
                [memory_name],
            ).fetchall()
            flat = con.execute(
                """SELECT unnest(vector) AS x FROM
                   (SELECT vector, created, rowid AS r FROM edit_memory WHERE memory_name = ? ORDER BY created, r)""",
                [memory_name],
            ).fetchnumpy()["x"]
        entries = [
            MemoryEntry(
                entry_id=eid,
                fact_text=fact,
                key_text=key,
                case_id=case_id,
                fact_key=f"{subj}\x1f{rel}" if subj is not None else None,
                active=bool(active),
            )
            for eid, case_id, fact, key, active, _n, subj, rel in rows
        ]
        dims = {int(r[5]) for r in rows}
        if len(dims) > 1:
            raise ValueError(f"memory {memory_name!r} mixes vector sizes {sorted(dims)}")
        dim = dims.pop() if dims else 0
        vectors = np.asarray(flat, dtype=np.float32).reshape(len(rows), dim)
        return entries, vectors
