"""The DuckDB ledger: one file, a versioned schema, migrations applied on open.

Only `storage/` speaks SQL. Every write runs in a transaction, so a crash mid-write
leaves the file as it was before the write. DuckDB lets one process hold a file open for
writing, and kedit has several (a flow, the server, the CLI), so connections are short:
open, do one unit of work, close; a process that finds the file locked retries for a while
before giving up with a clear message.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from kedit_core.errors import KeditError
from kedit_core.home import default_ledger_path
from storage.schema import MIGRATIONS, SCHEMA_VERSION


class StorageError(KeditError):
    """The ledger cannot be used; the message says why and what to do."""


def default_db_path(create: bool = True) -> Path:
    """KEDIT_DB if set (e.g. the demo's own ledger), else kedit.duckdb in the kedit home
    (which is created unless `create` is False)."""
    return default_ledger_path(create=create)


@dataclass
class Database:
    """A handle on the ledger file. Cheap to copy and pass around; holds no open connection."""

    path: Path
    lock_timeout_s: float = 60.0
    # A read-only handle (`open_db(..., create=False)`): DuckDB itself refuses any write
    # through it, so a read command can never change the ledger.
    read_only: bool = False

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside one transaction: committed on success, rolled back on error."""
        # Always a read-write connection: DuckDB refuses a read-only and a read-write handle
        # on one file in one process, and our connections are short anyway. `read_only`
        # only skips the explicit transaction.
        con = _connect_with_retry(self.path, self.lock_timeout_s, self.read_only)
        try:
            if read_only or self.read_only:
                yield con
            else:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        finally:
            con.close()

    def schema_version(self) -> int:
        with self.connect(read_only=True) as con:
            return _read_version(con)


def _connect_with_retry(path: Path, timeout_s: float, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            # Another process holds the write lock: wait for it (short transactions).
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StorageError(f"cannot open ledger {path}: {exc}") from exc
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 1.0)


def _read_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'kedit_meta'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT value FROM kedit_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def open_db(path: str | os.PathLike[str] | None = None, upto: int | None = None, create: bool = True) -> Database:
    """Open (creating if needed) the ledger and migrate it to the current schema.

    `upto` stops at an older schema version; tests use it to build previous-version files.
    `create=False` is for commands that only read: the ledger must already exist at the
    current schema, and the handle is read-only (nothing is created, migrated or written).
    Fails with StorageError if the file was written by a newer kedit.
    """
    db_path = Path(path) if path is not None else default_db_path(create=create)
    if not create:
        return _open_existing(db_path)
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, ...
        blocking = next((a for a in [db_path.parent, *db_path.parent.parents] if a.exists() and not a.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking is not None else (exc.strerror or str(exc))
        raise StorageError(f"cannot create the ledger's folder {db_path.parent}: {why}") from exc
    if db_path.is_dir():
        raise StorageError(f"ledger path {db_path} is a directory, not a ledger file")
    db = Database(db_path)
    target = SCHEMA_VERSION if upto is None else upto
    try:
        with db.connect() as con:
            current = _read_version(con)
            if current > SCHEMA_VERSION:
                raise StorageError(
                    f"{db_path} was written by a newer kedit (schema v{current}; this kedit knows up to "
                    f"v{SCHEMA_VERSION}). Upgrade kedit, or point KEDIT_HOME at another folder."
                )
            for version in range(current + 1, target + 1):
                for statement in MIGRATIONS[version]:
                    con.execute(statement)
                con.execute(
                    "INSERT OR REPLACE INTO kedit_meta (key, value) VALUES ('schema_version', ?)", [str(version)]
                )
    except duckdb.Error as exc:
        raise StorageError(f"{db_path} is not a usable kedit ledger: {exc}") from exc
    return db


def open_if_exists(path: str | os.PathLike[str] | None = None) -> Database | None:
    """The ledger opened read-only, or None where there is none yet: for commands that only
    look (`kedit ask`, `model info`, `cases`), which must not create or change a ledger."""
    db_path = Path(path) if path is not None else default_db_path(create=False)
    return _open_existing(db_path) if db_path.exists() else None


def _open_existing(db_path: Path) -> Database:
    if db_path.is_dir():
        raise StorageError(f"ledger path {db_path} is a directory, not a ledger file")
    if not db_path.is_file():
        raise StorageError(f"no ledger at {db_path}: nothing to read (a pipeline run creates it; "
                           "check --db / KEDIT_DB / KEDIT_HOME)")
    db = Database(db_path, read_only=True)
    try:
        current = db.schema_version()
    except duckdb.Error as exc:
        raise StorageError(f"{db_path} is not a usable kedit ledger: {exc}") from exc
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"{db_path} was written by a newer kedit (schema v{current}; this kedit knows up to "
            f"v{SCHEMA_VERSION}). Upgrade kedit, or point KEDIT_HOME at another folder."
        )
    if current < SCHEMA_VERSION:
        raise StorageError(
            f"{db_path} has schema v{current}, this kedit reads v{SCHEMA_VERSION}; a read-only command does not "
            "migrate it: run a writing command once (e.g. kedit nightly, or kedit rollback) to upgrade it"
        )
    return db
