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
