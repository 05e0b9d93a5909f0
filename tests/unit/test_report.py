"""The drift report's numbers are DuckDB's numbers: a real gated run on a tiny model
(accepted nudges, a harmful batch the gate rolls back, then a harmful batch accepted by a
disabled gate), then the report read back and compared with the ledger."""
from __future__ import annotations

import base64
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import gatekit as g
from gatekit import single_thread  # noqa: F401  (autouse fixture)
from flows.commands.report_cmd import ReportError, collect_report, parse_since
from flows.pipeline import apply_gated_batches
from flows.runtime import open_live_model
from kedit_core.gate import GateConfig
from kedit_core.regression import freeze_suite
from kedit_core.report import render_html, terminal_summary
from kedit_core.types import FactChange
from storage import ledger, pipeline_store, wikidata_store
from storage.db import open_db


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    # Module-scoped: one gated run (a few seconds) feeds every report test, read-only.
    home = tmp_path_factory.mktemp("report_home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KEDIT_HOME", str(home))
            return _run(open_db(home / "report.duckdb"))
    finally:
        torch.set_num_threads(threads)


def _run(db):
    live = open_live_model(db=db, lm=g.knowing_tiny_llama())
    suite = freeze_suite(live.lm, g.edit_cases("old"), known_facts=g.known_facts(), reference_text=g.REFERENCE_TEXT)
    cfg = GateConfig(full_check_every=2)
    nudge = g.NudgeEditor(g.NudgeConfig(scale=1e-3))
    apply_gated_batches(live, nudge, g.edit_cases("a", n=2), db, cfg, 1, "r1", suite)
    t_mid = ledger.utcnow()
    apply_gated_batches(live, g.HarmfulEditor(), g.edit_cases("h", n=1), db, cfg, 1, "r1h", suite)
    apply_gated_batches(live, nudge, g.edit_cases("b", n=3)[2:], db, cfg, 1, "r1", suite)
    no_gate = GateConfig(floors={}, max_drop={}, take_floor=0.0)
    lax = apply_gated_batches(live, g.HarmfulEditor(), g.edit_cases("lax", n=1), db, no_gate, 1, "r2", suite)
    _record_changes(db)
    return SimpleNamespace(db=db, t_mid=t_mid, lax_batch=lax.batches[0].batch_id)


def _record_changes(db):
    def change(revid, prop):
        return FactChange("Q1", prop, None, {"type": "string", "value": "x"}, "added", revid, "2026-01-01T00:00:00Z")

    ref = SimpleNamespace(revid=1, item="Q1", old_revid=None, timestamp="2026-01-01T00:00:00Z", user="u",
                          is_bot=False, is_anon=True, tags=[], comment="")
    outcome = SimpleNamespace(ref=ref, status="diffed", reason=None, changes=[
        (change(1, "P1"), "filtered", "reverted within 1 hour"),
        (change(1, "P2"), "quarantined", "anonymous edit to a protected property"),
    ])
    wikidata_store.record_outcomes(db, [outcome])


def _accepted(db, metric, method, before=None):
    status = {b["batch_id"]: b["status"] for b in ledger.list_batches(db)}
    rows = [r for r in ledger.get_metrics(db, metric=metric) if r["method"] == method]
    acc = [r for r in rows if status.get(r["batch_id"]) == "applied" and (before is None or r["created"] <= before)]
    base = [r for r in rows if r["batch_id"] is None and r["step"] == 0]
    return acc, base


def test_summary_numbers_are_the_ledgers(ran):
    db = ran.db
    data = collect_report(db, now=ran.t_mid + timedelta(days=7))  # "last week" = the moment between runs
    assert data.counts["cases"] == ledger.count_cases_by_status(db) == {"applied": 4, "rejected": 1}
    assert data.counts["changes"] == {"filtered": 1, "quarantined": 1}
    summary = {(r["method"], r["metric"]): r for r in data.summary}
    for metric in ("ref_ppl", "known_facts_acc", "suite_locality"):
        acc, base = _accepted(db, metric, "test_nudge")
        week, _ = _accepted(db, metric, "test_nudge", before=ran.t_mid)
        row = summary[("test_nudge", metric)]
        assert row["now"] == acc[-1]["value"] and row["base"] == base[-1]["value"]
        assert row["last_week"] == week[-1]["value"] and row["n"] == len(acc)
    assert summary[("test_nudge", "ref_ppl")]["now"] != summary[("test_nudge", "ref_ppl")]["last_week"]
    # The harmful method ran twice: rolled back by the gate, accepted with the gate off.
    acc, _ = _accepted(db, "known_facts_acc", "test_harmful")
    assert summary[("test_harmful", "known_facts_acc")]["now"] == acc[-1]["value"] < 0.5
    text = terminal_summary(data)
    assert f"{summary[('test_nudge', 'ref_ppl')]['now']:.3f}" in text
    rolled = [b for b in ledger.list_batches(db) if b["status"] == "rolled_back"]
    assert len(rolled) == 1 and rolled[0]["batch_id"] in text and "known_facts_acc" in rolled[0]["reason"]


def test_worst_hit_probes_come_from_the_accepted_damage(ran):
    data = collect_report(ran.db)
    damaged = {(r["kind"], r["prompt"]): r["score"] for r in pipeline_store.probe_rows(ran.db, ran.lax_batch)}
    assert data.worst_probes
    for p in data.worst_probes:
        assert p["latest"] == damaged[(p["kind"], p["prompt"])] < 1.0
    assert [p["latest"] for p in data.worst_probes] == sorted(p["latest"] for p in data.worst_probes)
    assert len(data.worst_probes) == min(15, sum(1 for s in damaged.values() if s < 1.0))


def test_html_is_self_contained_with_plots_and_tables(ran):
    data = collect_report(ran.db)
    page = render_html(data)
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 2 and all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    rolled = [b for b in data.batches if b["status"] == "rolled_back"][0]
    assert rolled["batch_id"] in page and "status-rolled_back" in page
    assert "reverted within 1 hour" in page and "anonymous edit to a protected property" in page
    rejected = ledger.case_rows(ran.db, status="rejected")
    assert rejected and all(r["case_id"] in page for r in rejected)


def test_since_filters_series_and_tables(ran):
    later = collect_report(ran.db, since=ledger.utcnow() + timedelta(days=1))
    assert later.series == [] and later.batches == [] and later.worst_probes == [] and later.filtered == []
    assert later.summary  # now/base/last week do not depend on --since


def test_cli_writes_the_report(ran, tmp_path):
    from flows.cli import _register_commands, app

    _register_commands()
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", "--db", str(ran.db.path), "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert "edit cases: applied 4, rejected 1" in res.output and out.read_text().startswith("<!DOCTYPE html>")


def test_parse_since():
    assert parse_since("2026-01-02").day == 2
    assert parse_since(None) is None
    assert abs((ledger.utcnow() - parse_since("3d")) - timedelta(days=3)) < timedelta(minutes=1)
    with pytest.raises(ReportError, match="not a date"):
        parse_since("yesterday-ish")
