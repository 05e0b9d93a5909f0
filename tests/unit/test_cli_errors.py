"""Every bad input to the CLI is one line naming the problem and a non-zero exit, never a
traceback (the traceback only under --debug / KEDIT_DEBUG=1); read-only commands never
create or modify files; files read back are written atomically (issue 23, points 1 and 6)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from flows.cli import main


def kedit(capsys, *args: str) -> tuple[int, str, str]:
    """Run `kedit ARGS` in-process as the console script does: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- one line, non-zero exit


def test_report_since_out_of_range_is_one_line(capsys, tmp_path):
    from storage.db import open_db

    db = open_db(tmp_path / "k.duckdb")
    code, _, err = kedit(capsys, "report", "--since", "999999999d", "--db", db.path)
    assert code == 2
    assert "--since" in one_error_line(err)


def test_ledger_whose_parent_is_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("KEDIT_DB", str(tmp_path / "afile" / "k.duckdb"))
    code, _, err = kedit(capsys, "rollback", "1", "--reason", "t")  # a writing command
    assert code == 2 and "afile" in one_error_line(err)
    code, _, err = kedit(capsys, "versions")
    assert code == 2 and "no ledger" in one_error_line(err)


@pytest.mark.parametrize("args", [["versions"], ["report"], ["quarantine", "list"]])
def test_read_commands_never_create_a_ledger(capsys, tmp_path, monkeypatch, args):
    missing = tmp_path / "nowhere" / "deeper" / "k.duckdb"
    monkeypatch.setenv("KEDIT_DB", str(missing))
    code, _, err = kedit(capsys, *args)
    assert code == 2 and "no ledger" in one_error_line(err)
    assert not (tmp_path / "nowhere").exists()
    # --db given explicitly: the same
    code, _, err = kedit(capsys, *args, "--db", missing)
    assert code == 2 and not (tmp_path / "nowhere").exists()


def test_read_commands_do_not_modify_the_ledger_or_the_home(capsys, tmp_path, monkeypatch, kedit_home):
    from storage import ledger
    from storage.db import open_db

    folder = tmp_path / "ledger"
    db = open_db(folder / "k.duckdb")
    ledger.ensure_base_version(db, "f" * 64, "tiny-llama")
    before, home_before = tree(folder), tree(kedit_home)
    monkeypatch.setenv("KEDIT_DB", str(db.path))
    for args in (["versions"], ["report"], ["quarantine", "list"]):
        code, out, err = kedit(capsys, *args)
        assert code == 0, err
    assert tree(folder) == before and tree(kedit_home) == home_before


def test_ask_and_model_info_with_no_ledger_answer_from_the_base_and_create_nothing(capsys, tmp_path, monkeypatch,
                                                                                   kedit_home):
    missing = tmp_path / "nowhere" / "k.duckdb"
    monkeypatch.setenv("KEDIT_DB", str(missing))
    home_before = tree(kedit_home)
    code, out, err = kedit(capsys, "ask", "Who?", "--model", "tiny-llama", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["version"] is None  # the unedited base, no version recorded
    code, out, err = kedit(capsys, "model", "info", "--model", "tiny-llama")
    assert code == 0, err
    assert "none (unedited base)" in out
    assert not (tmp_path / "nowhere").exists() and tree(kedit_home) == home_before


def test_ask_and_model_info_read_the_ledger_without_writing_it(capsys, tmp_path, monkeypatch, kedit_home):
    from kedit_core.model import load_model
    from storage import ledger
    from storage.db import open_db

    folder = tmp_path / "ledger"
    db = open_db(folder / "k.duckdb")
    other_base = ledger.ensure_base_version(db, "f" * 64, "another-model")
    monkeypatch.setenv("KEDIT_DB", str(db.path))
    before, home_before = tree(folder), tree(kedit_home)
    # a base the ledger has never seen: answered, and (unlike a pipeline run) not recorded
    code, out, err = kedit(capsys, "ask", "Who?", "--model", "tiny-llama", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["version"] is None
    assert tree(folder) == before and [int(v["version_id"]) for v in ledger.list_versions(db)] == [other_base]
    # a base the ledger knows: its live version, read only
    tiny = ledger.ensure_base_version(db, load_model("tiny-llama").fingerprint, "tiny-llama")
    before = tree(folder)
    code, out, err = kedit(capsys, "ask", "Who?", "--model", "tiny-llama", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["version"] == tiny
    code, out, err = kedit(capsys, "model", "info", "--model", "tiny-llama")
    assert code == 0 and f"live_version: {tiny}" in out, err
    assert tree(folder) == before and tree(kedit_home) == home_before


def test_read_command_on_an_old_schema_refuses_instead_of_migrating(capsys, tmp_path):
    from storage.db import open_db

    old = open_db(tmp_path / "old.duckdb", upto=1)
    before = tree(tmp_path)
    code, _, err = kedit(capsys, "versions", "--db", old.path)
    assert code == 2 and "schema v1" in one_error_line(err)
    assert tree(tmp_path) == before


def test_unexpected_exception_is_one_line_naming_it_and_the_command(capsys, tmp_path, monkeypatch):
    from storage import ledger
    from storage.db import open_db

    db = open_db(tmp_path / "k.duckdb")

    def boom(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(ledger, "list_versions", boom)
    monkeypatch.delenv("KEDIT_DEBUG", raising=False)
    code, _, err = kedit(capsys, "versions", "--db", db.path)
    line = one_error_line(err)
    assert code == 1 and "kedit versions" in line and "RuntimeError" in line and "something broke" in line
    assert "--debug" in line
    # the traceback on request: --debug anywhere, or KEDIT_DEBUG=1
    with pytest.raises(RuntimeError):
        main(["versions", "--db", str(db.path), "--debug"])
    monkeypatch.setenv("KEDIT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["versions", "--db", str(db.path)])


def test_bad_files_are_one_line(capsys, tmp_path):
    good = Path(__file__).resolve().parents[1] / "fixtures" / "wikidata" / "wbgetentities-Douglas-Adams.json"
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"entities": {"Q42": {"labels": "\xe9\xff"}}}')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for bad in (latin1, tmp_path, deep):  # non-UTF-8, a directory, nesting beyond the parser
        code, _, err = kedit(capsys, "diff", bad, good)
        assert code != 0
        one_error_line(err)


def test_ask_for_a_missing_version_fails_before_loading_the_model(capsys, monkeypatch):
    import flows.services.runtime

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the version was checked")

    monkeypatch.setattr(flows.services.runtime, "load_model", no_load)
    code, _, err = kedit(capsys, "ask", "Who?", "--model", "tiny-llama", "--version", "999")
    assert code == 2 and "version 999" in one_error_line(err)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    from kedit_core.atomic import atomic_target, atomic_write_text

    (tmp_path / "w").mkdir()
    target = tmp_path / "w" / "f.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_target(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_a_failed_html_report_leaves_the_previous_one(capsys, tmp_path, monkeypatch):
    import kedit_core.report
    from storage.db import open_db

    db = open_db(tmp_path / "k.duckdb")
    html = tmp_path / "r.html"
    html.write_text("<!DOCTYPE html>previous")
    monkeypatch.setattr(kedit_core.report, "render_html", lambda data: "<!DOCTYPE html>\ud800 cannot be encoded")
    code, _, err = kedit(capsys, "report", "--db", db.path, "--html", html)
    assert code != 0 and "Traceback" not in err
    assert html.read_text() == "<!DOCTYPE html>previous"  # not truncated by the failed write


def test_the_flow_report_is_written_atomically(tmp_path, monkeypatch):
    import kedit_core.report
    from flows.services import steps

    monkeypatch.setenv("KEDIT_DB", str(tmp_path / "k.duckdb"))
    html = tmp_path / "r.html"
    html.write_text("previous")
    monkeypatch.setattr(kedit_core.report, "render_html", lambda data: "\ud800")
    with pytest.raises(UnicodeEncodeError):
        steps.write_report(html=str(html))
    assert html.read_text() == "previous"


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    from kedit_core.atomic import remove_stale_tmp, tmp_path_for

    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale_pid = tmp_path / "deltas" / f"b1.safetensors.{dead}.tmp"
    stale_pid.parent.mkdir()
    stale_pid.write_bytes(b"half")
    old_plain = tmp_path / "suite.json.tmp"
    old_plain.write_text("half")
    os.utime(old_plain, (1, 1))
    fresh_plain = tmp_path / "other.json.tmp"  # maybe another process writing right now
    fresh_plain.write_text("half")
    mine = tmp_path_for(tmp_path / "x.json")  # this process's own write in progress
    mine.write_text("half")
    keep = tmp_path / "x.json"
    keep.write_text("{}")
    removed = remove_stale_tmp(tmp_path)
    assert sorted(removed) == sorted([stale_pid, old_plain])
    assert fresh_plain.exists() and mine.exists() and keep.exists() and not stale_pid.exists()


def test_truncated_lte_alignment_cache_is_rebuilt_with_a_warning(tiny_llama, caplog):
    from kedit_core.editors import get_editor

    tiny = {"max_alignment_records": 6, "steps": 2, "batch_size": 4, "base_answer_tokens": 3}
    _, first = get_editor("lte", tiny).align(tiny_llama)
    info_file = Path(first["path"]) / "alignment.json"
    assert not list(info_file.parent.glob("*.tmp"))
    info_file.write_text(info_file.read_text()[:20])  # as a crash mid-write left it before the fix
    with caplog.at_level("WARNING"):
        delta, again = get_editor("lte", tiny).align(tiny_llama)
    assert not again["cached"] and "unusable" in caplog.text and "rebuilding" in caplog.text
    assert json.loads(info_file.read_text())["sha256"] == again["sha256"]


def test_a_pipeline_run_removes_stale_temp_files_at_start(db, kedit_home):
    from flows.services.gated_batches import apply_gated_batches
    from flows.services.runtime import open_live_model
    from kedit_core.regression_gate import RegressionGateConfig
    from kedit_core.regression import freeze_suite
    from tests.unit import gatekit as g

    dead = 2 ** 22 + 4321
    stale = [kedit_home / "deltas" / f"x.safetensors.{dead}.tmp", db.path.parent / "reports" / "r.html.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    os.utime(stale[1], (1, 1))
    lm = g.knowing_tiny_llama()
    live = open_live_model(db=db, lm=lm)
    suite = freeze_suite(lm, g.edit_cases("old"), known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT)
    apply_gated_batches(live, g.NudgeEditor(), [], db, RegressionGateConfig(), 1, "run-clean", suite)
    assert not any(p.exists() for p in stale)


def test_a_ledger_folder_shared_with_other_programs_loses_only_kedit_temp_files(tmp_path):
    from kedit_core.atomic import clean_kedit_home

    shared = tmp_path / "shared"
    (shared / "reports").mkdir(parents=True)
    (shared / "deep").mkdir()
    theirs = [shared / "editor.swp.tmp", shared / "deep" / "x.99999999.tmp"]
    ours = [shared / f"k.duckdb.{2 ** 22 + 7}.tmp", shared / "reports" / f"r.html.{2 ** 22 + 7}.tmp"]
    for p in theirs + ours:
        p.write_text("x")
        os.utime(p, (1, 1))
    clean_kedit_home(shared)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)
