"""`kedit compare` end to end on a tiny model: one stream through two methods from the same
base, per-batch metrics in the DuckDB ledger, a side-by-side table."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import _register_commands, app
from flows.services.comparison import format_table, parse_methods
from tests.conftest import DATA

ZSRE = DATA / "benchmarks" / "zsre_mend_train_1k.json"


def _run(*args):
    if "compare" not in {c.name for c in app.registered_commands}:
        _register_commands()
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_compare_two_methods_records_every_batch(kedit_home, tmp_path):
    out = tmp_path / "cmp.json"
    res = _run("--methods", "rag,ft", "--data", f"zsre:{ZSRE}", "--limit", 4, "--batch-size", 2,
               "--model", "tiny-llama", "--no-greedy", "--set", "ft.steps=3", "--output", out)
    assert res.exit_code == 0, res.output
    assert "base restored after the last method: True" in res.output
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["rows"]] == ["rag", "ft"] and not doc["partial"]
    assert all("efficacy_acc" in r["metrics"] for r in doc["rows"])
    from storage.db import open_db
    from storage.ledger import get_metrics

    rows = get_metrics(open_db(), run_id=doc["run_id"], metric="immediate_efficacy_acc")
    # one row per batch (steps 0, 1) and the stream's final value (step 2), per method
    assert sorted((r["method"], r["step"]) for r in rows) == [("ft", 0), ("ft", 1), ("ft", 2), ("rag", 0), ("rag", 1), ("rag", 2)]
    assert get_metrics(open_db(), run_id=doc["run_id"], metric="locality")  # final metrics too


def test_compare_refuses_unknown_methods_and_settings_clearly(kedit_home):
    res = _run("--methods", "rag,nosuch", "--data", f"zsre:{ZSRE}", "--model", "tiny-llama")
    assert res.exit_code != 0 and "nosuch" in str(res.exception or res.output)
    res = _run("--methods", "rag", "--data", f"zsre:{ZSRE}", "--set", "ft.steps=3", "--model", "tiny-llama")
    assert res.exit_code != 0 and "METHOD.key=value" in str(res.exception or res.output)


def test_labels_and_table():
    assert parse_methods("rag,rag_nothr=rag") == [("rag", "rag"), ("rag_nothr", "rag")]
    table = format_table([{"label": "x", "metrics": {"efficacy_acc": 0.5}, "seconds_per_edit": 1.0},
                          {"label": "y", "error": "ValueError: broken"}], markdown=True)
    assert "| x | 0.500 | 1.00 |" in table and "failed: ValueError: broken" in table


def test_table_puts_served_answers_before_teacher_forced_figures():
    table = format_table([{"label": "x", "metrics": {"efficacy_acc": 0.9, "served_efficacy": 0.4,
                                                      "served_locality": 0.8}, "seconds_per_edit": 1.0}],
                         markdown=True)
    head = table.splitlines()[0]
    assert head.index("served eff.") < head.index("replies unchanged") < head.index("efficacy |")
    assert "| x | 0.400 | 0.800 | 0.900 | 1.00 |" in table
