from __future__ import annotations

import duckdb
import pytest

from kedit_core.types import EditCase, Probe
from storage import ledger
from storage.db import StorageError, open_db
from storage.schema import SCHEMA_VERSION


def _tables(path) -> set[str]:
    con = duckdb.connect(str(path))
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


def _columns(path) -> set[tuple[str, str]]:
    con = duckdb.connect(str(path))
    try:
        return set(con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall())
    finally:
        con.close()


def test_new_file_gets_current_schema(tmp_path):
    db = open_db(tmp_path / "a.duckdb")
    assert db.schema_version() == SCHEMA_VERSION
    tables = _tables(db.path)
    for t in ("model_versions", "revisions", "fact_changes", "edit_cases", "edit_batches", "metrics",
              "flow_cursors", "entity_labels", "edit_memory"):
        assert t in tables


def test_previous_schema_file_is_migrated_and_keeps_data(tmp_path):
    path = tmp_path / "old.duckdb"
    old = open_db(path, upto=SCHEMA_VERSION - 1)
    assert old.schema_version() == SCHEMA_VERSION - 1
    ledger.set_cursor(old, "nightly", "2026-01-01T00:00:00Z")
    before = _columns(path)
    db = open_db(path)
    assert db.schema_version() == SCHEMA_VERSION
    assert before != _columns(path) or SCHEMA_VERSION == 1
    assert _columns(path) == _columns(open_db(tmp_path / "fresh.duckdb").path)
    assert ledger.get_cursor(db, "nightly") == "2026-01-01T00:00:00Z"


def test_newer_schema_is_refused_clearly(tmp_path):
    path = tmp_path / "new.duckdb"
    db = open_db(path)
    with db.connect() as con:
        con.execute("UPDATE kedit_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 5)])
    with pytest.raises(StorageError, match="newer kedit"):
        open_db(path)


def test_not_a_database_is_refused_clearly(tmp_path):
    path = tmp_path / "junk.duckdb"
    path.write_bytes(b"this is not duckdb" * 100)
    with pytest.raises(StorageError, match="not usable|cannot open"):
        open_db(path)


def test_failed_transaction_leaves_no_partial_write(db):
    with pytest.raises(RuntimeError):
        with db.connect() as con:
            con.execute("INSERT INTO flow_cursors VALUES ('x', '1', now())")
            raise RuntimeError("crash mid-write")
    assert ledger.get_cursor(db, "x") is None


def test_versions_chain_and_live(db):
    base = ledger.ensure_base_version(db, "fp0", "tiny")
    assert ledger.ensure_base_version(db, "fp0", "tiny") == base
    v1 = ledger.add_version(db, base, "fp0", "tiny", "memit", "b1", "/d1", "sha1")
    v2 = ledger.add_version(db, v1, "fp0", "tiny", "memit", "b2", "/d2", "sha2")
    assert ledger.live_version(db, "fp0")["version_id"] == v2
    assert [r["version_id"] for r in ledger.version_chain(db, v2)] == [base, v1, v2]
    assert ledger.get_version(db, v1)["status"] == "superseded"
    ledger.set_version_status(db, v2, "rolled_back")
    ledger.set_live_version(db, "fp0", v1)
    assert ledger.live_version(db, "fp0")["version_id"] == v1


def test_cases_roundtrip_and_idempotent(db):
    case = EditCase(
        case_id="c1", subject="France", relation="P36", prompt="The capital of France is",
        target_new="Lyon", target_old="Paris", probes=[Probe("paraphrase", "France's capital is", "Lyon")],
    )
    assert ledger.upsert_cases(db, [case]) == 1
    assert ledger.upsert_cases(db, [case]) == 0
    [back] = ledger.get_cases(db, status="pending")
    assert back == case
    ledger.set_case_status(db, ["c1"], "rejected", reason="gate: locality")
    assert ledger.count_cases_by_status(db) == {"rejected": 1}
    assert ledger.case_rows(db)[0]["reason"] == "gate: locality"


def test_metrics_recorded(db):
    ledger.record_metrics(db, {"efficacy": 0.9, "locality": 1.0}, run_id="r", method="memit", step=3)
    rows = ledger.get_metrics(db, run_id="r")
    assert {(r["metric"], r["value"], r["step"]) for r in rows} == {("efficacy", 0.9, 3), ("locality", 1.0, 3)}


def test_a_version_is_recorded_only_on_the_live_version_it_was_built_from(db):
    """Compare-and-set: two writers built on the same live version; the second loses, and
    nothing of its commit is written (no version, cases still pending, batch still open)."""
    base = ledger.ensure_base_version(db, "fp0", "tiny")
    cases = [EditCase(case_id=f"c{i}", subject="S", relation="r", prompt="S is", target_new="x") for i in range(2)]
    ledger.upsert_cases(db, cases)
    assert ledger.create_batch(db, "b1", "run-a", "memit", ["c0"]) == ["c0"]
    assert ledger.create_batch(db, "b2", "run-b", "memit", ["c1"]) == ["c1"]
    v1 = ledger.commit_batch(db, "b1", base, "fp0", "tiny", "memit", ["c0"], "/d1", "sha1", "w1")
    with pytest.raises(ledger.VersionConflict, match=f"built on {base} but the live version is now {v1}") as err:
        ledger.commit_batch(db, "b2", base, "fp0", "tiny", "memit", ["c1"], "/d2", "sha2", "w2")
    assert err.value.live_id == v1
    assert [(v["version_id"], v["status"]) for v in ledger.list_versions(db)] == [(base, "base"), (v1, "live")]
    assert {r["case_id"]: r["status"] for r in ledger.case_rows(db)} == {"c0": "applied", "c1": "pending"}
    assert {b["batch_id"]: b["status"] for b in ledger.list_batches(db)} == {"b1": "applied", "b2": "applying"}
    # add_version takes the same check when asked.
    with pytest.raises(ledger.VersionConflict):
        ledger.add_version(db, base, "fp0", "tiny", "memit", None, None, None, expected_live=base)
    v2 = ledger.add_version(db, v1, "fp0", "tiny", "memit", None, None, None, expected_live=v1)
    assert [r["version_id"] for r in ledger.version_chain(db, v2)] == [base, v1, v2]


def test_a_case_in_another_runs_applying_batch_cannot_be_claimed(db):
    cases = [EditCase(case_id=f"c{i}", subject="S", relation="r", prompt="S is", target_new="x") for i in range(3)]
    ledger.upsert_cases(db, cases)
    owner = {"pid": 4242, "host": "box", "start": "77"}
    assert ledger.create_batch(db, "a-b1", "run-a", "memit", ["c0", "c1"], owner=owner) == ["c0", "c1"]
    # The other run asks for all three: only the free one is claimed, in a batch of one.
    assert ledger.create_batch(db, "b-b1", "run-b", "memit", ["c0", "c1", "c2"], claimable=("pending",)) == ["c2"]
    assert ledger.create_batch(db, "b-b2", "run-b", "memit", ["c0", "c1"], claimable=("pending",)) == []
    batches = {b["batch_id"]: b for b in ledger.list_batches(db)}
    assert sorted(batches) == ["a-b1", "b-b1"] and batches["b-b1"]["n_cases"] == 1
    assert (batches["a-b1"]["owner_pid"], batches["a-b1"]["owner_host"], batches["a-b1"]["owner_start"]) == (
        4242, "box", "77")
    # Once the first batch is settled its cases are free again, but an applied one is not claimable.
    ledger.finish_batch(db, "a-b1", "rolled_back", "gate")
    ledger.set_case_status(db, ["c0"], "applied")
    assert ledger.create_batch(db, "b-b3", "run-b", "memit", ["c0", "c1"], claimable=("pending",)) == ["c1"]


def test_the_ledger_opens_without_importing_torch(tmp_path):
    """storage finds kedit's home through kedit_core/home.py, not the torch-loading model
    module: a read command on the ledger does not pay for importing torch."""
    import os
    import subprocess
    import sys

    code = ("import sys; from storage.db import open_db, default_db_path; default_db_path(); "
            f"open_db({str(tmp_path / 'k.duckdb')!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KEDIT_HOME": str(tmp_path / "home")})
    assert out.stdout.strip() == "False", out.stderr
