"""The drift report's numbers are DuckDB's numbers: a real gated run on a tiny model
(accepted nudges, a harmful batch the gate rolls back, then a harmful batch accepted by a
disabled gate), then the report read back and compared with the ledger. Served metrics and
`kedit compare` runs are written into a ledger file as the pipeline and compare write them."""
from __future__ import annotations

import base64
import html
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import gatekit as g
from gatekit import single_thread  # noqa: F401  (autouse fixture)
from flows.commands.report_cmd import ReportError, parse_since
from storage.report_queries import collect_report
from flows.services.gated_batches import apply_gated_batches
from flows.services.runtime import open_live_model
from kedit_core.regression_gate import RegressionGateConfig
from kedit_core.regression import freeze_suite
from kedit_core.report import LEGEND, comparisons, over_time_metrics, render_html, terminal_summary
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
    # these tests need accepted batches beside a rolled-back one (gatekit says why no served floors)
    cfg = g.gate_without_served_locality(full_check_every=2)
    nudge = g.NudgeEditor(g.NudgeConfig(scale=1e-3))
    apply_gated_batches(live, nudge, g.edit_cases("a", n=2), db, cfg, 1, "r1", suite)
    t_mid = ledger.utcnow()
    apply_gated_batches(live, g.HarmfulEditor(), g.edit_cases("h", n=1), db, cfg, 1, "r1h", suite)
    apply_gated_batches(live, nudge, g.edit_cases("b", n=3)[2:], db, cfg, 1, "r1", suite)
    no_gate = RegressionGateConfig(floors={}, max_drop={}, take_floor=0.0)
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


# --------------------------------------------------------------------------- served metrics and comparisons

# Two methods, three batches each, as `kedit compare` records them: per batch the immediate
# figures and timings, then the final figures after the last batch.
NEW_RUN = {
    "memit": ([0.91, 0.83, 0.77], {"served_efficacy": 0.71, "served_paraphrase": 0.62, "served_locality": 0.93,
                                   "served_retention": 0.55, "efficacy_acc": 0.88, "paraphrase_acc": 0.74,
                                   "locality": 0.97, "retention_acc": 0.66}),
    "rag": ([0.44, 0.52, 0.58], {"served_efficacy": 0.41, "served_paraphrase": 0.36, "served_locality": 0.99,
                                 "served_retention": 0.47, "efficacy_acc": 0.58, "paraphrase_acc": 0.49,
                                 "locality": 1.0, "retention_acc": 0.51}),
}
COMPARE_HEADS = ["served_efficacy", "served_paraphrase", "served_locality", "served_retention",
                 "efficacy_acc", "paraphrase_acc", "locality", "retention_acc", "s/edit"]


def _record_compare(db, run_id, per_method, failed=()):
    ledger.start_run(db, run_id, "compare", {"methods": ",".join(per_method)}, "fp")
    for method, (curve, final) in per_method.items():
        for step, v in enumerate(curve):
            ledger.record_metrics(db, {"immediate_served_efficacy": v, "immediate_efficacy_acc": v / 2,
                                       "seconds": 1.5, "mean_steps": 3.0, "delta_norm": 0.2},
                                  run_id=run_id, method=method, step=step, model_fingerprint="fp")
        ledger.record_metrics(db, {**final, "immediate_served_efficacy": 0.5, "seconds_per_edit": 0.25},
                              run_id=run_id, method=method, step=len(curve), model_fingerprint="fp")
    for method in failed:
        ledger.record_metrics(db, {"failed": 1.0}, run_id=run_id, method=method, model_fingerprint="fp")
    ledger.finish_run(db, run_id, "partial" if failed else "done")


def _html_table(fragment):
    """(headers, {first cell: other cells}) of the first table in an HTML fragment."""
    table = fragment.split("<table>", 1)[1].split("</table>", 1)[0]
    heads = [html.unescape(h) for h in re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table)]
    rows = [[html.unescape(c) for c in re.findall(r"<td(?: [^>]*)?>(.*?)</td>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", table)]
    return heads, {r[0]: r[1:] for r in rows if r}


@pytest.fixture
def compared(db):
    _record_compare(db, "compare-old", {"memit": ([], {"served_efficacy": 0.11, "efficacy_acc": 0.12})})
    _record_compare(db, "compare-new", NEW_RUN, failed=["lte"])
    return collect_report(db)


def test_html_compares_methods_of_the_latest_compare_runs(compared):
    page = render_html(compared)
    section = page.split("<h2>Method comparisons</h2>")[1].split("<h2>Batches</h2>")[0]
    new, old = section.split("<h3>compare-new</h3>")[1].split("<h3>compare-old</h3>")  # newest first
    heads, rows = _html_table(new)
    assert heads == ["method"] + COMPARE_HEADS  # served first; no column nobody reported (served_negation)
    for method, (_, final) in NEW_RUN.items():
        assert rows[method] == [f"{final[m]:.3f}" for m in COMPARE_HEADS[:-1]] + ["0.25"]
    assert rows["lte (failed)"] == ["-"] * len(COMPARE_HEADS)
    assert _html_table(old) == (["method", "served_efficacy", "efficacy_acc", "s/edit"],
                                {"memit": ["0.110", "0.120", "0.25"]})
    # The per-batch curves: a PNG for the run with batches, none for the one without.
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 1 and pngs[0] in new and base64.b64decode(pngs[0])[:4] == b"\x89PNG"
    assert "no per-batch figures" in old


def test_compare_curves_are_per_batch_figures_by_batch_index(compared):
    new = comparisons(compared)[0]
    assert new.run_id == "compare-new" and new.methods == ["memit", "rag", "lte"]
    assert {m: dict(v) for m, v in new.curves.items()} == {
        "immediate_served_efficacy": {m: list(enumerate(curve)) for m, (curve, _) in NEW_RUN.items()},
        "immediate_efficacy_acc": {m: [(i, v / 2) for i, v in enumerate(curve)] for m, (curve, _) in NEW_RUN.items()},
    }  # timings and editor info are not curves; the final step's average is not a batch
    assert new.final["memit"]["immediate_served_efficacy"] == 0.5
    assert [c.run_id for c in comparisons(compared, limit=1)] == ["compare-new"]


def test_terminal_shows_the_newest_comparison(compared):
    text = terminal_summary(compared)
    assert "compare-old" not in text and LEGEND in text.splitlines()
    block = text.split("method comparison compare-new", 1)[1].splitlines()
    assert "1 earlier compare run(s) in the HTML report" in block[0]
    header = block[1]
    assert header.index("srv eff") < header.index("srv ret") < header.index("eff acc") < header.index("s/edit")
    lines = {line.split()[0]: line.split()[1:] for line in block[2:5]}
    for method, (_, final) in NEW_RUN.items():
        assert lines[method] == [f"{final[m]:.3f}" for m in COMPARE_HEADS[:-1]] + ["0.25"]
    assert lines["lte"] == ["(failed)"] + ["-"] * len(COMPARE_HEADS)


GATE_METRICS = {"efficacy_acc": 0.9, "served_locality": 0.8, "locality": 0.95, "ref_ppl": 30.0,
                "served_efficacy": 0.7, "served_fluency": 0.6, "zeta_acc": 0.5, "edit_seconds": 2.0,
                "suite_served_locality": 0.85, "suite_locality": 0.96}
SERVED_FIRST = ["served_efficacy", "served_locality", "suite_served_locality", "served_fluency",
                "efficacy_acc", "locality", "suite_locality", "ref_ppl", "zeta_acc"]


def _record_gated_batch(db):
    """A base measurement and one accepted batch, as the gated pipeline records them."""
    ledger.start_run(db, "n1", "nightly", {}, "fp")
    base = ledger.ensure_base_version(db, "fp", "tiny")
    ledger.record_metrics(db, {m: v * 0.9 for m, v in GATE_METRICS.items()}, run_id="n1", method="memit", step=0,
                          version_id=base)
    cases = g.edit_cases("a", n=1)
    ledger.upsert_cases(db, cases)
    ledger.create_batch(db, "b1", "n1", "memit", [c.case_id for c in cases])
    vid = ledger.add_version(db, base, "fp", "tiny", "memit", "b1", None, None)
    ledger.finish_batch(db, "b1", "applied", version_id=vid)
    ledger.record_metrics(db, GATE_METRICS, run_id="n1", method="memit", step=1, version_id=vid, batch_id="b1")
    ledger.finish_run(db, "n1", "done")


def test_served_metrics_come_first_in_tables_and_plots(db):
    _record_gated_batch(db)
    data = collect_report(db)
    lines = terminal_summary(data).splitlines()
    assert LEGEND in lines
    start = lines.index("method memit:") + 2  # past the column header
    listed = [line.split()[0] for line in lines[start:start + len(SERVED_FIRST)]]
    assert listed == SERVED_FIRST and f"{GATE_METRICS['served_efficacy']:.3f}" in lines[start]
    assert over_time_metrics(data) == SERVED_FIRST  # the over-time panels, served first
    page = render_html(data)
    table = page.split("<h2>Metrics now vs base vs last week</h2>")[1].split("<h2>")[0]
    assert re.findall(r"<tr><td>([a-z_]+)</td>", table) == SERVED_FIRST
    assert len(re.findall(r"data:image/png;base64,", page)) == 2  # over versions and over time
    assert comparisons(data) == [] and "no <code>kedit compare</code> runs recorded" in page  # a nightly run is no comparison
