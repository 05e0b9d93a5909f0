"""Every deployment `kedit schedule` serves resolves, as the Prefect runner would, to a flow
that imports and takes the parameters we pass, and each one (nightly, backfill, compare,
report) is started once through its entrypoint, with its parameters as stored (JSON), on a
tiny model against the replayed Wikidata, and does real work in the ledger."""
from __future__ import annotations

import json

import pytest
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint

import tests.flows.flowkit  # noqa: F401  (registers the test editors)
from flows import prefect_flows
from flows.commands.pipeline_cmds import deployments
from storage import ledger
from storage.db import open_db
from tests.conftest import DATA
from tests.flows.conftest import flow_settings
from tests.flows.dumpdays import ACCEPTED_BY_DAY, DAYS, build_replay_folder, write_daily_dumps

CRON = "0 3 * * *"
ZSRE = DATA / "benchmarks" / "zsre_mend_train_1k.json"
EXPECTED = {  # deployment -> (flow function, parameters callers pass by name)
    "nightly": (prefect_flows.nightly_update, ["window_end", "window_hours", "settings", "report_html"]),
    "backfill": (prefect_flows.backfill, ["start", "end", "chunk_hours", "source", "dump_path", "items", "settings"]),
    "compare": (prefect_flows.compare_methods, ["stream", "methods", "limit", "batch_size", "model", "settings", "greedy",
                                            "device", "dtype"]),
    "report": (prefect_flows.drift_report, ["since", "html"]),
}


def _served() -> dict:
    return {d.name: d for d in deployments(CRON)}


def _run(deployment, **params):
    """Start a deployment's flow the way the runner does: load its entrypoint, pass the
    parameters as stored (JSON)."""
    flow = load_flow_from_entrypoint(deployment.entrypoint)
    return flow(**json.loads(json.dumps(params)))


def test_every_served_deployment_resolves_to_its_flow_with_the_expected_parameters():
    served = _served()
    assert sorted(served) == sorted(EXPECTED)
    for name, (fn, params) in EXPECTED.items():
        d = served[name]
        flow = load_flow_from_entrypoint(d.entrypoint)  # a real import of the entrypoint's file
        assert isinstance(flow, Flow), name
        assert flow.name == d.flow_name == fn.name, name
        # The same code as the flow the other tests import and run.
        assert flow.fn.__code__.co_filename == fn.fn.__code__.co_filename, name
        assert flow.fn.__qualname__ == fn.fn.__qualname__, name
        assert list(flow.parameters.properties) == params, name
        crons = [s.schedule.cron for s in d.schedules]
        assert crons == ([CRON] if name == "nightly" else []), name
        # Writers run one at a time per deployment (the ledger's lock covers the rest).
        assert d.concurrency_limit == (None if name == "report" else 1), name


def test_compare_and_report_deployments_run_once_on_a_tiny_model(prefect_api, ledger_path, tmp_path):
    served = _served()
    # One case, one method under a label with a setting: the label and --set paths of
    # `kedit compare` without the cost of a second stream.
    out = _run(served["compare"], stream=f"zsre:{ZSRE}", methods=["small=nudge"], limit=1, batch_size=1,
               model="tiny-llama", settings=["small.scale=0.0002"], greedy=False)
    assert out["status"] == "done" and out["cases"] == 1 and out["restored"]
    assert list(out["methods"]) == ["small"] and "efficacy_acc" in out["methods"]["small"]["metrics"]
    db = open_db(ledger_path)
    [run] = ledger.list_runs(db, kind="compare")
    assert run["run_id"] == out["run_id"] and run["status"] == "done"
    assert json.loads(run["config"])["configs"]["small"]["scale"] == 0.0002  # the setting reached the editor
    rows = ledger.get_metrics(db, run_id=out["run_id"], metric="immediate_efficacy_acc")
    assert sorted((r["method"], r["step"]) for r in rows) == [("small", 0), ("small", 1)]  # the batch, the final

    html = tmp_path / "drift.html"
    report = _run(served["report"], html=str(html))
    assert report["html"] == str(html)
    assert out["run_id"] in html.read_text(encoding="utf-8")  # the comparison is in the report


@pytest.fixture
def replay_days(tmp_path):
    """The recorded day (2024-05-01) plus three days of incremental dumps' revisions, served on 127.0.0.1."""
    from connectors.replay import ReplayServer

    with ReplayServer(build_replay_folder(tmp_path / "wikidata")) as url:
        yield url


def test_nightly_and_backfill_deployments_run_once_on_a_tiny_model(prefect_api, ledger_path, replay_days, tmp_path):
    served = _served()
    settings = flow_settings(replay_days, 4)
    html = tmp_path / "nightly.html"
    night = _run(served["nightly"], window_end="2024-05-02T00:00:00+00:00", window_hours=24, settings=settings,
                 report_html=str(html))
    db = open_db(ledger_path)
    [run] = ledger.list_runs(db, kind="nightly")
    assert run["run_id"] == night["run_id"] and run["status"] == "completed"
    assert night["windows"] == [["2024-05-01T00:00:00+00:00", "2024-05-02T00:00:00+00:00"]]
    applied = night["edits"]["applied_cases"]
    assert applied >= 5 and ledger.count_cases_by_status(db) == {"applied": applied}
    assert ledger.get_cursor(db, "nightly:window_end") == "2024-05-02T00:00:00+00:00"
    assert html.exists() and night["run_id"] in html.read_text(encoding="utf-8")

    dumps = write_daily_dumps(tmp_path / "dumps")
    out = _run(served["backfill"], start="2024-05-02T00:00:00+00:00", end="2024-05-05T00:00:00+00:00",
               chunk_hours=24, source="dump", dump_path=str(dumps), items=None, settings=settings)
    [run] = ledger.list_runs(db, kind="backfill")
    assert run["run_id"] == out["run_id"] and run["status"] == "completed"
    assert [c["chunk"][:10] for c in out["chunks"]] == DAYS
    assert [c["changes_accepted"] for c in out["chunks"]] == [ACCEPTED_BY_DAY[d] for d in DAYS]
    assert all(c["revisions_failed"] == 0 and c["applied"] >= 1 for c in out["chunks"])
    backfilled = sum(c["applied"] for c in out["chunks"])
    assert ledger.count_cases_by_status(db).get("applied") == applied + backfilled
    assert ledger.get_cursor(db, "backfill:2024-05-02T00:00:00+00:00:2024-05-05T00:00:00+00:00") == (
        "2024-05-05T00:00:00+00:00")
