"""The ledger's schema as an ordered list of migrations.

MIGRATIONS[n] takes a file from schema version n-1 to n. Never edit a released migration:
append a new one, bump nothing else (SCHEMA_VERSION follows the list). JSON columns are
TEXT holding JSON, so the SQL stays portable to other engines.
"""
from __future__ import annotations

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE IF NOT EXISTS kedit_meta (key TEXT PRIMARY KEY, value TEXT)""",
        # One row per model version. Version 0 of a base is the base itself (no delta).
        """CREATE TABLE model_versions (
            version_id INTEGER PRIMARY KEY,
            parent_id INTEGER,
            base_fingerprint TEXT NOT NULL,
            base_spec TEXT,
            created TIMESTAMP NOT NULL,
            status TEXT NOT NULL,          -- base | live | superseded | rolled_back
            method TEXT,
            batch_id TEXT,
            delta_path TEXT,
            delta_sha256 TEXT,
            weights_fingerprint TEXT,      -- fingerprint of the weights with this version applied
            note TEXT
        )""",
        # Every revision the connector has seen, with what became of it.
        """CREATE TABLE revisions (
            revid BIGINT PRIMARY KEY,
            item TEXT NOT NULL,
            old_revid BIGINT,
            timestamp TIMESTAMP,
            user_name TEXT,
            is_bot BOOLEAN,
            is_anon BOOLEAN,
            tags TEXT,                     -- JSON list
            comment TEXT,
            status TEXT NOT NULL,          -- seen | diffed | filtered | failed
            reason TEXT,
            seen_at TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE fact_changes (
            change_id TEXT PRIMARY KEY,
            revid BIGINT,
            old_revid BIGINT,
            subject TEXT NOT NULL,
            property TEXT NOT NULL,
            datatype TEXT,
            kind TEXT NOT NULL,            -- added | removed | updated
            old_value TEXT,                -- JSON
            new_value TEXT,                -- JSON
            qualifiers TEXT,               -- JSON
            timestamp TIMESTAMP,
            status TEXT NOT NULL,          -- accepted | filtered | quarantined | cased
            reason TEXT,
            created TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE edit_cases (
            case_id TEXT PRIMARY KEY,
            change_id TEXT,
            source TEXT NOT NULL,
            subject TEXT NOT NULL,
            relation TEXT NOT NULL,
            body TEXT NOT NULL,            -- EditCase as JSON
            status TEXT NOT NULL,          -- pending | applied | rejected | filtered | superseded
            reason TEXT,
            batch_id TEXT,
            created TIMESTAMP NOT NULL,
            updated TIMESTAMP
        )""",
        """CREATE TABLE edit_batches (
            batch_id TEXT PRIMARY KEY,
            run_id TEXT,
            method TEXT NOT NULL,
            status TEXT NOT NULL,          -- pending | applying | applied | rolled_back | rejected | failed
            reason TEXT,
            version_id INTEGER,
            n_cases INTEGER,
            attempt INTEGER DEFAULT 1,
            created TIMESTAMP NOT NULL,
            finished TIMESTAMP
        )""",
        """CREATE TABLE metrics (
            run_id TEXT,
            method TEXT,
            step INTEGER,
            metric TEXT NOT NULL,
            value DOUBLE,
            version_id INTEGER,
            batch_id TEXT,
            model_fingerprint TEXT,
            created TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE flow_cursors (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,            -- nightly | backfill | compare | evaluate
            started TIMESTAMP NOT NULL,
            finished TIMESTAMP,
            status TEXT NOT NULL,
            config TEXT,                   -- JSON
            model_fingerprint TEXT
        )""",
    ],
    2: [
        # Label cache for Wikidata entities (wbgetentities), so re-runs do not re-ask the API.
        """CREATE TABLE entity_labels (
            entity_id TEXT PRIMARY KEY,
            label TEXT,
            description TEXT,
            aliases TEXT,                  -- JSON list
            lang TEXT,
            fetched_at TIMESTAMP NOT NULL
        )""",
        # The memory of memory editors (retrieval, LTE): facts and their embeddings.
        """CREATE TABLE edit_memory (
            entry_id TEXT PRIMARY KEY,
            memory_name TEXT NOT NULL,
            case_id TEXT,
            fact_text TEXT NOT NULL,
            key_text TEXT NOT NULL,
            vector FLOAT[],
            created TIMESTAMP NOT NULL,
            active BOOLEAN NOT NULL DEFAULT TRUE
        )""",
    ],
    3: [
        # Per-probe scores from the regression gate (known facts, locality drift), so the
        # drift report can list the worst-hit facts; aggregates stay in `metrics`.
        """CREATE TABLE probe_results (
            run_id TEXT,
            method TEXT,
            step INTEGER,
            batch_id TEXT,
            version_id INTEGER,
            kind TEXT NOT NULL,            -- known_fact | locality | locality_other | locality_same
            prompt TEXT NOT NULL,
            expected TEXT,
            score DOUBLE,
            created TIMESTAMP NOT NULL
        )""",
    ],
    4: [
        # Which process owns a batch while it is 'applying' (pid, host, the OS's start time of
        # that process), so start-up recovery leaves a live run's batch alone and an operator
        # can tell whose it was; runs record the same of the process that ran them.
        "ALTER TABLE edit_batches ADD COLUMN owner_pid BIGINT",
        "ALTER TABLE edit_batches ADD COLUMN owner_host TEXT",
        "ALTER TABLE edit_batches ADD COLUMN owner_start TEXT",
        "ALTER TABLE runs ADD COLUMN pid BIGINT",
        "ALTER TABLE runs ADD COLUMN host TEXT",
    ],
    5: [
        # Why a pending case was superseded, filtered or kept as a correction before editing
        # (kedit_core.corrections): the case row's own reason is cleared once it is applied,
        # so the decision that made it an edit (e.g. "reverts revision R applied in version V")
        # is kept here.
        """CREATE TABLE case_decisions (
            case_id TEXT NOT NULL,
            run_id TEXT,
            status TEXT NOT NULL,          -- superseded | filtered | pending
            reason TEXT NOT NULL,
            created TIMESTAMP NOT NULL
        )""",
    ],
    6: [
        # What an operator decided about a quarantined fact change (`kedit quarantine`):
        # 'released' (the change becomes an edit case on the next run) or 'rejected' (the
        # change's status becomes 'rejected', never applied), by whom and why, with the
        # quarantine reason it had.
        """CREATE TABLE quarantine_decisions (
            change_id TEXT NOT NULL,
            decision TEXT NOT NULL,        -- released | rejected
            decided_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            quarantine_reason TEXT,
            created TIMESTAMP NOT NULL
        )""",
    ],
}

SCHEMA_VERSION: int = max(MIGRATIONS)
