"""`kedit evaluate` end to end on a tiny model: a real stream, JSON out, metrics in the ledger."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from flows.commands import evaluate_cmd
from tests.conftest import DATA


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    evaluate_cmd.register(app)

    @app.callback()
    def _root() -> None:  # keep `evaluate` as a named sub-command
        pass

    return app


def test_evaluate_writes_json_and_ledger_metrics(app, tmp_path, kedit_home):
    out = tmp_path / "result.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate", "--method", "memit", "--data", f"zsre:{DATA / 'benchmarks' / 'zsre_mend_train_1k.json'}",
            "--limit", "4", "--batch-size", "2", "--model", "tiny-llama", "--output", str(out), "--no-greedy",
            "--set", "layers=1,2", "--set", "solve.keystats_samples=400", "--set", "targets.steps=2",
            "--set", "targets.bf16=false",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["n_cases"] == 4 and data["batch_size"] == 2 and len(data["batches"]) == 2
    for key in ("efficacy_acc", "paraphrase_acc", "locality", "retention_acc"):
        assert 0.0 <= data["metrics"][key] <= 1.0
    assert data["seconds_per_edit"] > 0 and len(data["fingerprint"]) == 64
    assert data["hyperparameters"]["layers"] == [1, 2] and data["hyperparameters"]["targets"]["steps"] == 2

    from storage.db import open_db
    from storage.ledger import get_metrics

    rows = get_metrics(open_db(), run_id=data["run_id"])
    assert {r["step"] for r in rows} == {0, 1}
    assert any(r["metric"] == "retention_acc" for r in rows)


def test_evaluate_rejects_unknown_setting(app, kedit_home):
    from kedit_core.errors import KeditError

    res = CliRunner().invoke(
        app, ["evaluate", "--method", "memit", "--data", "zsre:nowhere.json", "--set", "nonsense=1", "--no-record"]
    )
    assert res.exit_code != 0 and isinstance(res.exception, KeditError)
    assert "unknown settings" in str(res.exception)


def test_parse_settings_types():
    from kedit_core.editor_settings import parse_settings

    got = parse_settings(["layers=3,4,5", "targets.lr=0.5", "targets.bf16=false", "solve.keystats_corpus=/x.txt",
                          "layers2=[1]", "update_gate.quantile=null"])
    assert got == {"layers": [3, 4, 5], "targets": {"lr": 0.5, "bf16": False}, "solve": {"keystats_corpus": "/x.txt"},
                   "layers2": [1], "update_gate": {"quantile": None}}
