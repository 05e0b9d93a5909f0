"""The Prefect flows, run through Prefect (one test server per session), on tiny models and
the recorded Wikidata day replayed from 127.0.0.1 through the real `requests` client."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from flows.services.runtime import open_live_model
from kedit_core.model import fingerprint_model
from storage import ledger
from storage.db import open_db
from tests.flows.conftest import flow_settings

REPO = Path(__file__).resolve().parents[2]
DAY_END = datetime(2024, 5, 2, tzinfo=timezone.utc)
# Accept every batch that does not hurt: the tiny test editors do not make facts "take".
def _settings(url: str, batch_size: int = 3, **extra) -> dict:
    return flow_settings(url, batch_size, **extra)


def _live_weights_match_ledger(db) -> None:
    """Rebuilding the live version from the base plus stored deltas gives the recorded weights."""
    base_fp = ledger.list_versions(db)[0]["base_fingerprint"]
    live_row = ledger.live_version(db, base_fp)
    rebuilt = open_live_model("tiny-llama", db=db)
    assert rebuilt.version_id == live_row["version_id"]
    if live_row.get("weights_fingerprint"):
        assert fingerprint_model(rebuilt.lm.model) == live_row["weights_fingerprint"]


def test_nightly_applies_the_day_and_a_rerun_applies_nothing(prefect_api, ledger_path, replay):
    from flows.prefect_flows import nightly_update

    first = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay))
    assert first["ingest"]["revisions_new"] == first["ingest"]["revisions_seen"] > 0
    assert first["ingest"]["changes_quarantined"] >= 1  # the profanity edit never reaches the model
    n_cases = first["cases"]["new_cases"]
    assert n_cases >= 5
    assert first["edits"]["applied_cases"] == n_cases
    db = open_db(ledger_path)
    versions = ledger.list_versions(db)
    assert len(versions) == 1 + first["edits"]["applied_batches"]
    assert Path(first["report"]["html"]).exists()

    second = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay))
    assert second["ingest"]["revisions_new"] == 0
    assert second["cases"]["new_cases"] == 0
    assert second["edits"]["applied_cases"] == 0
    assert len(ledger.list_versions(db)) == len(versions)
    assert ledger.count_cases_by_status(db) == {"applied": n_cases}
    _live_weights_match_ledger(db)


def test_gate_rolls_back_a_harmful_batch_inside_the_flow(prefect_api, ledger_path, replay):
    from flows.prefect_flows import nightly_update

    out = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay, method="harmful", batch_size=50))
    assert out["edits"]["applied_cases"] == 0
    assert out["edits"]["rolled_back_batches"] >= 1
    db = open_db(ledger_path)
    rows = ledger.case_rows(db)
    assert rows and all(r["status"] == "rejected" and r["reason"] for r in rows)
    assert [v["status"] for v in ledger.list_versions(db)] == ["base"]
    base = open_live_model("tiny-llama", db=db)
    assert fingerprint_model(base.lm.model) == base.lm.fingerprint  # nothing of the harm remains
    batches = ledger.list_batches(db)
    assert all(b["status"] in ("rolled_back", "rejected") for b in batches)


def test_backfill_over_several_days_is_resumable(prefect_api, ledger_path, replay):
    from flows.prefect_flows import backfill

    items = ["Q42", "Q1040", "Q131261", "Q328212", "Q571", "Q2112", "Q646148"]
    start, end = datetime(2024, 4, 29, tzinfo=timezone.utc), datetime(2024, 5, 3, tzinfo=timezone.utc)
    out = backfill(start=start, end=end, items=items, settings=_settings(replay))
    assert [c["chunk"][:10] for c in out["chunks"]] == ["2024-04-29", "2024-04-30", "2024-05-01", "2024-05-02"]
    applied = sum(c["applied"] for c in out["chunks"])
    assert applied >= 3
    only_day = [c for c in out["chunks"] if c["applied"]]
    assert [c["chunk"][:10] for c in only_day] == ["2024-05-01"]
    again = backfill(start=start, end=end, items=items, settings=_settings(replay))
    assert again["chunks"] == []  # every chunk finished: nothing re-read, nothing re-applied
    db = open_db(ledger_path)
    assert ledger.count_cases_by_status(db).get("applied") == applied


def test_killed_run_resumes_without_applying_twice(prefect_api, ledger_path, replay, tmp_path):
    """Kill a real flow run (a subprocess) in the middle of a batch, then run again."""
    pause = tmp_path / "paused"
    env = dict(os.environ, KEDIT_DB=str(ledger_path), KEDIT_TEST_PAUSE_FILE=str(pause), PREFECT_API_URL=prefect_api)
    code = (
        "import tests.flows.flowkit, json, sys; from datetime import datetime, timezone;"
        "from flows.prefect_flows import nightly_update;"
        f"nightly_update(window_end=datetime(2024, 5, 2, tzinfo=timezone.utc), window_hours=24, settings={_settings(replay)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not pause.exists():
            assert proc.poll() is None, "the flow run ended before reaching a batch"
            assert time.monotonic() < deadline, "the flow run never reached a batch"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    db = open_db(ledger_path)
    assert [b["status"] for b in ledger.list_batches(db)] == ["applying"]  # killed mid-batch
    cases_before = ledger.count_cases_by_status(db)
    assert cases_before.get("applied", 0) == 0

    from flows.prefect_flows import nightly_update

    out = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay))
    counts = ledger.count_cases_by_status(db)
    n = sum(cases_before.values())
    assert counts == {"applied": n}  # every case applied once, none lost
    assert out["edits"]["applied_cases"] == n
    statuses = [b["status"] for b in ledger.list_batches(db)]
    assert statuses.count("applying") == 0
    _live_weights_match_ledger(db)


def test_server_down_at_publish_is_recorded_and_the_nights_edits_stay(prefect_api, ledger_path, replay):
    """Publishing to a server that is down: retried, then recorded; the run completes and
    the next run publishes again (every run publishes the live version)."""
    import socket

    from flows.prefect_flows import nightly_update

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = nightly_update(window_end=DAY_END, window_hours=24,
                         settings=_settings(replay, server_url=dead, network_retry_delays_s=[0.1]))
    assert "error" in out["publish"] and out["publish"]["server"] == dead
    assert out["edits"]["applied_cases"] >= 5
    db = open_db(ledger_path)
    assert ledger.list_runs(db, kind="nightly")[-1]["status"] == "completed"


def test_nightly_cli_passes_editor_settings_and_rejects_unknown_ones_before_ingesting(prefect_api, ledger_path, replay):
    import json

    from typer.testing import CliRunner

    from flows.cli import _register_commands, app

    _register_commands()
    common = ["nightly", "--model", "tiny-llama", "--method", "nudge", "--endpoint", replay, "--window-end", "2024-05-02"]
    bad = CliRunner().invoke(app, [*common, "--set", "scal=2"])
    assert bad.exit_code != 0 and "scal" in str(bad.exception)
    assert not ledger_path.exists() or not ledger.list_runs(open_db(ledger_path))  # nothing ran

    ok = CliRunner().invoke(app, [*common, "--set", "scale=0.0002", "--set", "pause_s=0"])
    assert ok.exit_code == 0, ok.output
    run = ledger.list_runs(open_db(ledger_path), kind="nightly")[-1]
    assert json.loads(run["config"])["editor_overrides"] == {"scale": 0.0002, "pause_s": 0}
    assert ledger.list_batches(open_db(ledger_path))  # the editor ran with them


def test_the_nightly_publishes_the_live_version_into_another_engines_folder(prefect_api, ledger_path, replay, tmp_path):
    """KEDIT_PUBLISH_DIR (flows/services/publish.py): each run exports the live version there and runs
    the publish command; a rerun with nothing new exports nothing and announces nothing."""
    from flows.prefect_flows import nightly_update

    folder, marker = tmp_path / "engine-models", tmp_path / "announced"
    extra = {"publish_dir": str(folder), "publish_format": "hf",
             "publish_command": f'echo "$KEDIT_PUBLISHED_VERSION" >> {marker}'}
    out = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay, **extra))
    live = out["edits"]["live_version"]
    assert out["engine"] == {"version": live, "folder": str(folder / "versions" / f"v{live}"), "exported": True,
                             "notified": {"command": "ok"}}
    assert (folder / "kedit-live").resolve().name == f"v{live}" and (folder / "kedit-live" / "model.safetensors").exists()
    assert marker.read_text().split() == [str(live)]
    again = nightly_update(window_end=DAY_END, window_hours=24, settings=_settings(replay, **extra))
    assert again["engine"]["version"] == live and again["engine"]["exported"] is False
    assert marker.read_text().split() == [str(live)]  # not announced twice
