"""One writer per ledger, with real processes running the real nightly flow (Prefect, the
recorded day replayed from 127.0.0.1, a tiny model, one DuckDB file on disk): a second run
started while the first is mid-batch is refused in one line naming the first (exit 2, no
traceback); a second run told to wait starts when the first ends, and together they apply
every case exactly once, in one linear chain of versions whose rebuild is the live weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from flows.services.runtime import open_live_model
from kedit_core.model import fingerprint_model
from storage import ledger
from storage.db import open_db
from storage.lock import lock_path, read_holder
from tests.flows.conftest import flow_settings

REPO = Path(__file__).resolve().parents[2]
RUN = """
import json, sys
import tests.flows.flowkit
from datetime import datetime
from flows.services import steps
from flows.prefect_flows import nightly_update
from flows.services.settings import PipelineSettings
from kedit_core.model import fingerprint_model
args = json.loads(sys.argv[1])
out = nightly_update(window_end=datetime.fromisoformat(args["end"]), window_hours=args["hours"],
                     settings=args["settings"])
live = steps.live_model(PipelineSettings(model="tiny-llama"))
print("RESULT " + json.dumps({"run_id": out["run_id"], "applied": out["edits"].get("applied_cases", 0),
                              "version": live.version_id, "weights": fingerprint_model(live.lm.model)}))
"""


def _settings(url: str, **extra) -> dict:
    return flow_settings(url, batch_size=2, **extra)


def _env(ledger_path: Path, prefect_api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEDIT_TEST_")}
    return {**env, "KEDIT_DB": str(ledger_path), "PREFECT_API_URL": prefect_api, **extra}


def _start(args: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    [line] = [x for x in out.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, f"the first run ended before {what}"
        assert time.monotonic() < deadline, f"the first run never reached {what}"
        time.sleep(0.2)


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(timeout=30)


def test_a_second_run_is_refused_in_one_line_while_the_first_holds_the_ledger(prefect_api, ledger_path, replay,
                                                                               tmp_path):
    pause, resume = tmp_path / "paused", tmp_path / "resume"
    first = _start({"end": "2024-05-02T00:00:00+00:00", "hours": 24, "settings": _settings(replay)},
                   _env(ledger_path, prefect_api, KEDIT_TEST_PAUSE_FILE=str(pause), KEDIT_TEST_RESUME_FILE=str(resume)))
    try:
        _wait_for(pause, first, "its first batch")  # mid-batch, holding the ledger
        second = subprocess.run(
            [sys.executable, "-m", "flows.cli", "nightly", "--model", "tiny-llama", "--method", "nudge",
             "--endpoint", replay, "--window-end", "2024-05-02"],
            cwd=REPO, env=_env(ledger_path, prefect_api), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        [line] = [x for x in second.stderr.splitlines() if x.strip()]
        assert line == (f"error: another run (pid {first.pid}, host {read_holder(lock_path(ledger_path)).host}, "
                        f"started {read_holder(lock_path(ledger_path)).started}, kind nightly) holds the ledger "
                        f"{lock_path(ledger_path)}")
        resume.touch()
        done = _result(first)
    finally:
        _kill(first)
    db = open_db(ledger_path)
    assert [r["run_id"] for r in ledger.list_runs(db)] == [done["run_id"]]  # the refused run wrote nothing
    assert done["applied"] > 0 and ledger.count_cases_by_status(db) == {"applied": done["applied"]}
    assert read_holder(lock_path(ledger_path)) is None  # released


def test_two_runs_at_once_apply_every_case_exactly_once_in_one_linear_chain(prefect_api, ledger_path, replay,
                                                                           tmp_path):
    pause, resume = tmp_path / "paused", tmp_path / "resume"
    # The first run takes the morning of the recorded day; the second, told to wait, the whole day.
    first = _start({"end": "2024-05-01T12:00:00+00:00", "hours": 12, "settings": _settings(replay)},
                   _env(ledger_path, prefect_api, KEDIT_TEST_PAUSE_FILE=str(pause), KEDIT_TEST_RESUME_FILE=str(resume)))
    second = None
    try:
        _wait_for(pause, first, "its first batch")
        second = _start({"end": "2024-05-02T00:00:00+00:00", "hours": 24,
                         "settings": _settings(replay, lock_wait_s=300)}, _env(ledger_path, prefect_api))
        time.sleep(3)
        assert second.poll() is None  # waiting for the ledger ...
        assert read_holder(lock_path(ledger_path)).pid == first.pid  # ... which the first run holds
        resume.touch()
        one, two = _result(first), _result(second)
    finally:
        _kill(first, *([second] if second else []))
    assert one["applied"] > 0 and two["applied"] > 0  # both runs edited

    db = open_db(ledger_path)
    cases = ledger.case_rows(db)
    assert {r["status"] for r in cases} == {"applied"} and len(cases) == one["applied"] + two["applied"]
    # Exactly once: every applied batch has its own version, and the applied batches hold each case once.
    applied = [b for b in ledger.list_batches(db) if b["status"] == "applied"]
    assert sum(b["n_cases"] for b in applied) == len(cases)
    assert {r["batch_id"] for r in cases} == {b["batch_id"] for b in applied}
    assert {b["run_id"] for b in applied} == {one["run_id"], two["run_id"]}
    assert all(b["status"] != "applying" for b in ledger.list_batches(db))
    # One linear chain: each version's parent is the one before it, all but the last superseded.
    versions = ledger.list_versions(db)
    assert [v["parent_id"] for v in versions[1:]] == [v["version_id"] for v in versions[:-1]]
    assert [v["status"] for v in versions] == ["base"] + ["superseded"] * (len(versions) - 2) + ["live"]
    assert sorted(v["batch_id"] for v in versions[1:]) == sorted(b["batch_id"] for b in applied)
    # The live weights: what the last run held, what the ledger recorded, what a rebuild gives.
    live_row = versions[-1]
    assert two["version"] == live_row["version_id"] and two["weights"] == live_row["weights_fingerprint"]
    rebuilt = open_live_model("tiny-llama", db=db)
    assert rebuilt.version_id == live_row["version_id"]
    assert fingerprint_model(rebuilt.lm.model) == live_row["weights_fingerprint"]
