"""`kedit cases OLD NEW`: runs the real diff + case builder on the recorded Q42 revisions."""
import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import _register_commands, app

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "wikidata"  # byte-exact copies (SOURCES.md)
LABELS = Path(__file__).resolve().parents[1] / "fixtures" / "labels" / "q42_labels.json"
OLD, NEW = RECORDED / "wbgetentities-Q6-Q42-P31.json", RECORDED / "wbgetentities-Douglas-Adams.json"


def _run(*args):
    if not app.registered_commands or "cases" not in {c.name for c in app.registered_commands}:
        _register_commands()
    return CliRunner().invoke(app, ["cases", *map(str, args)])


def test_cases_json_on_real_q42_revisions():
    res = _run(OLD, NEW, "--offline", "--labels", LABELS, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["changes"] == 4
    assert [c["target_new"] for c in out["cases"]] == ["Dirk Gently's Holistic Detective Agency"]
    assert sorted(d["reason"] for d in out["dropped"]) == ["identifier_like"] * 3


def test_cases_text_and_unlabelled_offline():
    res = _run(OLD, NEW, "--offline", "--labels", LABELS)
    assert res.exit_code == 0, res.output
    assert "A notable work of Douglas Adams is -> Dirk Gently's Holistic Detective Agency" in res.output
    # without labels for the values, the change is dropped with a reason, never shown as a Q-id
    res = _run(OLD, NEW, "--offline")
    assert "new_value_unlabelled" in res.output and "-> Q902712" not in res.output


def test_cases_online_reads_labels_without_creating_or_writing_a_ledger(server, tmp_path, monkeypatch):
    """`kedit cases` only looks: labels come from the API (here the replay server) and the
    ledger's cache where one exists; no ledger is created and an existing one is not written."""
    from storage import wikidata_store
    from storage.db import open_db

    monkeypatch.setenv("KEDIT_ENDPOINT", server.url)
    monkeypatch.setenv("KEDIT_DB", str(tmp_path / "nowhere" / "k.duckdb"))
    res = _run(OLD, NEW, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["changes"] == 4
    assert not (tmp_path / "nowhere").exists()

    db = open_db(tmp_path / "k.duckdb")
    wikidata_store.put_labels(db, [("Q902712", "Dirk Gently's Holistic Detective Agency", None, ())], "en")
    monkeypatch.setenv("KEDIT_DB", str(db.path))
    before = db.path.read_bytes()
    res = _run(OLD, NEW, "--json")
    assert res.exit_code == 0, res.output
    # the cached label was read (the replay day has none for Q902712) ...
    assert [c["target_new"] for c in json.loads(res.output)["cases"]] == ["Dirk Gently's Holistic Detective Agency"]
    assert db.path.read_bytes() == before  # ... and nothing was written back
