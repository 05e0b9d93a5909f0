"""`--config FILE` (issue #21): per-model editor settings in a TOML or YAML file, a table
per method, `--set` winning over the file; a bad file is one line."""
from __future__ import annotations

import json

import pytest

from kedit_core.editor_settings import settings_file
from kedit_core.errors import KeditError
from tests.conftest import DATA
from tests.unit.test_cli_errors import kedit, one_error_line

ZSRE = f"zsre:{DATA / 'benchmarks' / 'zsre_mend_train_1k.json'}"

TOML = """
# SmolLM2-sized settings for a tiny test model, as a user keeps per model
layers = [1, 2]

[solve]
keystats_samples = 600

[targets]
bf16 = false

[alphaedit]
targets.steps = 3
update_gate = { chats = 0 }

[memit.targets]
steps = 7
"""


def test_top_level_keys_and_the_method_s_table_in_order(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(TOML)
    pairs = settings_file(f, "alphaedit")
    assert pairs == ["layers=[1, 2]", "solve.keystats_samples=600", "targets.bf16=false", "targets.steps=3",
                     "update_gate.chats=0"]
    assert "targets.steps=7" in settings_file(f, "memit")
    y = tmp_path / "tiny.yaml"
    y.write_text("solve:\n  keystats_samples: 600\nalphaedit:\n  targets:\n    steps: 3\n")
    assert settings_file(y, "alphaedit") == ["solve.keystats_samples=600", "targets.steps=3"]


def test_evaluate_takes_the_file_and_set_wins(tmp_path, capsys):
    f = tmp_path / "tiny.toml"
    f.write_text(TOML)
    out = tmp_path / "result.json"
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "2", "--batch-size", "2", "--no-greedy", "--no-record", "--output", out,
                         "--config", f, "--set", "targets.steps=2")
    assert code == 0, err
    hp = json.loads(out.read_text())["hyperparameters"]
    assert hp["solve"]["keystats_samples"] == 600 and hp["layers"] == [1, 2] and hp["targets"]["bf16"] is False
    assert hp["targets"]["steps"] == 2  # --set over the file's [alphaedit] targets.steps = 3
    assert hp["targets"]["kl_factor"] == 0.5  # the rest of the group keeps AlphaEdit's defaults


@pytest.mark.parametrize("name,text,message", [
    ("x.toml", "layers = [", "not valid TOML"),
    ("x.toml", "[alphaedt]\nlayers = [3]\n", "tables ['alphaedt'] name no editing method and no group of settings"),
    ("x.yaml", "- 1\n- 2\n", "expected settings (key = value), got a list"),
    ("x.ini", "layers=3", "give a .toml or .yaml file"),
])
def test_a_bad_file_is_one_line(tmp_path, capsys, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(KeditError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        settings_file(f, "alphaedit")
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "1", "--no-record", "--config", f)
    assert code == 2 and message in one_error_line(err)


def test_an_unknown_setting_in_the_file_is_refused_before_any_work(tmp_path, capsys):
    f = tmp_path / "x.toml"
    f.write_text("no_such_setting = 1\n")
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "1", "--no-record", "--config", f)
    assert code == 2 and "no_such_setting" in one_error_line(err)


def test_an_old_flat_name_is_one_line_naming_the_new_one(tmp_path, capsys):
    """Settings are grouped (docs/editing.md, "Settings"): `--set v_steps=...` and a file's
    flat `update_gate = 0.999` are refused with the dotted name to use instead."""
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "1", "--no-record", "--set", "v_steps=2")
    assert code == 2 and "v_steps is an old name: it is now targets.steps" in one_error_line(err)
    f = tmp_path / "old.toml"
    f.write_text("update_gate = 0.999\n")
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "1", "--no-record", "--config", f)
    assert code == 2 and "update_gate is an old name: it is now update_gate.quantile" in one_error_line(err)
    code, _, err = kedit(capsys, "evaluate", "--model", "tiny-llama", "--data", ZSRE,
                         "--limit", "1", "--no-record", "--set", "share_subject_delta=false")
    assert code == 2 and "share_subject_delta is retired" in one_error_line(err)
