"""The drift report: how the served model changed over versions and time, and how the
methods of the latest `kedit compare` runs did side by side.

Pure rendering: `ReportData` holds rows already read from the ledger (see
`storage.report_queries`, gathered by `flows/commands/report_cmd.py`); this module turns
them into a terminal summary and a self-contained HTML page (matplotlib plots embedded
as base64 PNG, no external files or scripts).
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kedit_core.regression_gate import LOWER_IS_BETTER

# Served-answer metrics (free chat replies, kedit_core/served_answers.py) come first: they
# are what users of `kedit serve` see; the teacher-forced ones follow.
SERVED_METRICS = (
    "served_efficacy",
    "served_paraphrase",
    "served_locality",
    "served_locality_same",
    "served_locality_correct",
    "suite_served_locality",
    "suite_served_locality_same",
    "served_negation",
    "served_negation_pn",
    "served_retention",
    "served_retention_paraphrase",
    "immediate_served_efficacy",
    "immediate_served_paraphrase",
)
# Metrics in the order a reader cares about; anything else measured is listed after them.
KEY_METRICS = SERVED_METRICS + (
    "efficacy_acc",
    "paraphrase_acc",
    "locality",
    "suite_locality",
    "known_facts_acc",
    "known_facts_em",
    "ref_ppl",
    "fluency_ge",
    "retention_acc",
    "negation_acc",
    "negation_pn",
    "efficacy_em",
    "multihop_acc",
)
# Bookkeeping recorded beside the metrics: shown in no metric table or plot.
BOOKKEEPING = frozenset({"edit_seconds", "check_seconds", "delta_norm", "full_check", "accepted"})
LEGEND = "served_* = free chat replies as `kedit serve` gives them; *_acc = teacher-forced token accuracy"

# `kedit compare` table: (metric, short title for the terminal), served first; a column no
# method of the run reported is left out.
COMPARE_COLUMNS = (
    ("served_efficacy", "srv eff"),
    ("served_paraphrase", "srv para"),
    ("served_locality", "srv loc"),
    ("served_retention", "srv ret"),
    ("served_negation", "srv neg"),
    ("efficacy_acc", "eff acc"),
    ("paraphrase_acc", "para acc"),
    ("locality", "locality"),
    ("retention_acc", "ret acc"),
    ("seconds_per_edit", "s/edit"),
)
# Recorded per batch by `kedit compare` beside the figures (timings, editor info, the
# failure marker): not curves of edit quality.
COMPARE_NOT_CURVES = BOOKKEEPING | {"seconds", "mean_steps", "failed"}
COMPARE_RUNS_SHOWN = 3  # most recent compare runs in the HTML; the terminal shows the newest


@dataclass
class ReportData:
    generated: datetime
    since: datetime | None
    ledger: str
    counts: dict[str, dict[str, int]]  # versions/cases/changes/batches -> status -> n
    live: list[dict[str, Any]]  # live version rows
    summary: list[dict[str, Any]]  # method, metric, now, base, last_week, n
    series: list[dict[str, Any]]  # metric rows with batch_status
    batches: list[dict[str, Any]]
    worst_probes: list[dict[str, Any]]
    filtered: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    backlog: dict[str, Any] = field(default_factory=dict)  # pending, over_budget, oldest_change


@dataclass
class Comparison:
    """One `kedit compare` run as the ledger holds it (flows/services/comparison.py): per
    method, one row set per batch (step = batch index) and a final row set after the last
    batch, the step where `seconds_per_edit` is recorded; a failed method has `failed`."""

    run_id: str
    started: datetime | None
    status: str | None
    methods: list[str] = field(default_factory=list)  # in the order they ran
    final: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    failed: set[str] = field(default_factory=set)
    # metric -> method -> [(batch index, value)]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def state(self, method: str) -> str:
        if method in self.failed:
            return "failed"
        return "" if method in self.final else "unfinished"  # stopped before its final figures

    def columns(self) -> list[tuple[str, str]]:
        return [(m, t) for m, t in COMPARE_COLUMNS if any(m in f for f in self.final.values())]


def _is_served(name: str) -> bool:
    # served_*, and the same reply-based figures under a prefix (immediate_served_*, suite_served_*)
    return name.startswith("served_") or "_served_" in name


def _metric_order(names: set[str]) -> list[str]:
    names = {n for n in names if n not in BOOKKEEPING}
    rank = {m: i for i, m in enumerate(KEY_METRICS)}
    # Served before teacher-forced, also for a served metric KEY_METRICS does not name yet.
    return sorted(names, key=lambda n: (not _is_served(n), rank.get(n, len(rank)), n))


def comparisons(data: ReportData, limit: int = COMPARE_RUNS_SHOWN) -> list[Comparison]:
    """The `limit` most recent compare runs found in `data.series` (so `--since` applies),
    newest first."""
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in data.series:
        if r.get("run_kind") == "compare" and r["method"] is not None:
            by_run[r["run_id"]].append(r)
    runs = [_comparison(run_id, rows) for run_id, rows in by_run.items()]
    runs.sort(key=lambda c: c.started or datetime.min, reverse=True)
    return runs[:limit]


def _comparison(run_id: str, rows: list[dict[str, Any]]) -> Comparison:
    c = Comparison(run_id, rows[0].get("run_started"), rows[0].get("run_status"))
    final_step = {r["method"]: r["step"] for r in rows if r["metric"] == "seconds_per_edit"}
    for r in rows:  # series rows come in time order: methods in the order they ran
        method, metric, value = r["method"], r["metric"], r["value"]
        if method not in c.methods:
            c.methods.append(method)
        if metric == "failed":
            c.failed.add(method)
        elif value is None:
            continue
        elif method in final_step and r["step"] == final_step[method]:
            c.final[method][metric] = value
        elif r["step"] is not None and metric not in COMPARE_NOT_CURVES:
            c.curves[metric][method].append((r["step"], value))
    return c


def _compare_cells(c: Comparison, method: str, columns: list[tuple[str, str]]) -> list[str]:
    """A method's row, unescaped: its label (with failed/unfinished) and each column's value."""
    state = c.state(method)
    cells = [f"{method} ({state})" if state else method]
    for metric, _ in columns:
        v = c.final.get(method, {}).get(metric)
        timing = metric == "seconds_per_edit" and isinstance(v, float) and math.isfinite(v)
        cells.append(f"{v:.2f}" if timing else _fmt(v))  # seconds to 2 places, as `kedit compare` prints them
    return cells


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _change(metric: str, now: float | None, ref: float | None) -> tuple[str, str]:
    """Signed change now - ref and whether it is good/bad/flat for this metric."""
    if now is None or ref is None:
        return "", "flat"
    d = now - ref
    if abs(d) < 1e-9:
        return "±0", "flat"
    better = (d < 0) if metric in LOWER_IS_BETTER else (d > 0)
    return f"{d:+.3f}", "good" if better else "bad"


# --------------------------------------------------------------------------- terminal


def backlog_line(backlog: dict[str, Any]) -> str:
    """What waits for the next run, in one line."""
    oldest = backlog.get("oldest_change")
    return (f"waiting for the next run: {backlog['pending']} pending edit cases, {backlog.get('over_budget', 0)} "
            f"of them over a run's edit budget" + (f"; oldest change {oldest:%Y-%m-%d %H:%M} UTC" if oldest else ""))


def terminal_summary(data: ReportData) -> str:
    c = data.counts
    lines = [f"kedit drift report  ({data.generated:%Y-%m-%d %H:%M} UTC, ledger {data.ledger})"]
    if data.since:
        lines.append(f"since {data.since:%Y-%m-%d %H:%M}")
    v = c.get("versions", {})
    live = ", ".join(f"v{r['version_id']} ({r['status']}, {r.get('base_spec') or '?'})" for r in data.live) or "none"
    lines.append(f"versions: {sum(v.values())} ({_kv(v)}); live: {live}")
    lines.append(f"edit cases: {_kv(c.get('cases', {})) or 'none'}")
    if data.backlog.get("pending"):
        lines.append(backlog_line(data.backlog))
    lines.append(f"fact changes: {_kv(c.get('changes', {})) or 'none'}")
    b = c.get("batches", {})
    lines.append(f"batches: {sum(b.values())} ({_kv(b)})")
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in data.summary:
        by_method[r["method"] or "-"].append(r)
    runs = comparisons(data)
    if by_method or runs:
        lines.append(LEGEND)
    for method, rows in sorted(by_method.items()):
        rows = {r["metric"]: r for r in rows}
        lines.append("")
        lines.append(f"method {method}:")
        w = max([22] + [len(m) + 2 for m in rows])  # served names run long (suite_served_locality_same)
        lines.append(f"  {'metric':<{w}}{'now':>10}{'base':>10}{'Δ base':>10}{'last week':>11}{'Δ week':>10}")
        for m in _metric_order(set(rows)):
            r = rows[m]
            lines.append(
                f"  {m:<{w}}{_fmt(r['now']):>10}{_fmt(r['base']):>10}{_change(m, r['now'], r['base'])[0]:>10}"
                f"{_fmt(r['last_week']):>11}{_change(m, r['now'], r['last_week'])[0]:>10}"
            )
    if runs:
        lines += _terminal_comparison(runs[0], more=len(runs) - 1)
    rolled = [x for x in data.batches if x["status"] in ("rolled_back", "rejected", "failed")]
    if rolled:
        lines.append("")
        lines.append(f"rolled back / failed batches: {len(rolled)}")
        for x in rolled[-5:]:
            lines.append(f"  {x['batch_id']} ({x['method']}, attempt {x['attempt']}): {x['reason']}")
    for n in data.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _terminal_comparison(c: Comparison, more: int) -> list[str]:
    """The newest compare run as a plain table (only its final figures: the curves are in the HTML)."""
    when = f"{c.started:%Y-%m-%d %H:%M}" if isinstance(c.started, datetime) else "?"
    lines = ["", f"method comparison {c.run_id} (started {when}, {c.status or '?'})"
             + (f"; {more} earlier compare run(s) in the HTML report" if more else "") + ":"]
    columns = c.columns()
    table = [["method"] + [t for _, t in columns]] + [_compare_cells(c, m, columns) for m in c.methods]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        lines.append("  " + "  ".join(cell.rjust(w) if i else cell.ljust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return lines


def _kv(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(d.items()))


# --------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt

    cols = 3 if n > 4 else max(n, 1)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _series_label(method: str | None, run: str | None, several_runs: bool) -> str:
    return f"{method}/{run}" if several_runs else (method or "-")


def plot_over_versions(data: ReportData) -> str | None:
    """One panel per metric: accepted values by model version, a line per method (and run
    when one method ran several times), the base value dashed, and each rolled-back
    attempt as a red cross half-way after the version it was tried on."""
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in data.series if r["metric"] not in BOOKKEEPING and r["value"] is not None]
    acc = [r for r in rows if r["batch_status"] == "applied"]
    bad = [r for r in rows if r["batch_status"] in ("rolled_back", "rejected", "failed")]
    metrics = _metric_order({r["metric"] for r in acc + bad})
    if not metrics:
        return None
    runs_per_method: dict[str, set[str]] = defaultdict(set)
    for r in acc:
        runs_per_method[r["method"]].add(r["run_id"])
    fig, axes = _grid(len(metrics))
    base = {(r["method"], r["metric"]): r["base"] for r in data.summary}
    for ax, m in zip(axes, metrics):
        lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in acc:
            if r["metric"] == m and r["version_id"] is not None:
                key = _series_label(r["method"], r["run_id"], len(runs_per_method[r["method"]]) > 1)
                lines[key].append((r["version_id"], r["value"]))
        for i, (label, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, color=f"C{i}")
        crosses = [(r["version_id"] + 0.5, r["value"]) for r in bad if r["metric"] == m and r["version_id"] is not None]
        if crosses:
            ax.scatter([c[0] for c in crosses], [c[1] for c in crosses], marker="x", color="red", s=30, zorder=5,
                       label="rolled back")
            if m in LOWER_IS_BETTER:
                ax.set_yscale("log")  # a harmful batch's perplexity is orders of magnitude off
        for method in sorted({r["method"] for r in acc + bad if r["metric"] == m}):
            b = base.get((method, m))
            if b is not None:
                ax.axhline(b, ls="--", lw=1, color="grey")
        ax.set_title(m + ("  (lower is better)" if m in LOWER_IS_BETTER else ""), fontsize=10)
        ax.set_xlabel("model version", fontsize=8)
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # one version: widen so the integer locator has ticks to place
            mid = (lo + hi) / 2
            ax.set_xlim(mid - 1, mid + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or crosses:
            ax.legend(fontsize=7)
    fig.suptitle("Metrics over model versions (dashed: base model; red x: rolled-back attempt after that version)",
                 fontsize=11)
    return _png(fig)


def plot_over_time(data: ReportData) -> str | None:
    """One panel per metric over time: accepted measurements as lines per method, the
    measurements of rolled-back attempts as red crosses."""
    import matplotlib.dates as mdates

    rows = [r for r in data.series if r["metric"] not in BOOKKEEPING and r["batch_id"] is not None]
    metrics = over_time_metrics(data)
    if not metrics:
        return None
    fig, axes = _grid(len(metrics))
    for ax, m in zip(axes, metrics):
        acc: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
        bad: list[tuple[datetime, float]] = []
        for r in rows:
            if r["metric"] != m or r["value"] is None:
                continue
            if r["batch_status"] == "applied":
                acc[r["method"] or "-"].append((r["created"], r["value"]))
            elif r["batch_status"] in ("rolled_back", "rejected", "failed"):
                bad.append((r["created"], r["value"]))
        for i, (label, pts) in enumerate(sorted(acc.items())):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, color=f"C{i}")
        if bad:
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", color="red", s=30, zorder=5,
                       label="rolled back")
        if m in LOWER_IS_BETTER and bad and acc:
            ax.set_yscale("log")  # a harmful batch's perplexity is orders of magnitude off
        ax.set_title(m + ("  (lower is better)" if m in LOWER_IS_BETTER else ""), fontsize=10)
        ax.tick_params(labelsize=7)
        times = {p[0] for pts in acc.values() for p in pts} | {p[0] for p in bad}
        if len(times) == 1:  # one measurement: an hour either side, not matplotlib's years
            t = next(iter(times))
            ax.set_xlim(t - timedelta(minutes=30), t + timedelta(minutes=30))
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
        if bad or len(acc) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Metrics over time (red x: measured on a batch that was rolled back)", fontsize=11)
    return _png(fig)


def over_time_metrics(data: ReportData) -> list[str]:
    """The panels of `plot_over_time`, served first: every metric measured on a batch."""
    return _metric_order({r["metric"] for r in data.series if r["batch_id"] is not None})


def plot_comparison_curves(c: Comparison) -> str | None:
    """One panel per per-batch metric of a compare run (immediate_served_efficacy first):
    value against batch index, a line per method."""
    from matplotlib.ticker import MaxNLocator

    metrics = _metric_order(set(c.curves))
    if not metrics:
        return None
    fig, axes = _grid(len(metrics))
    for ax, m in zip(axes, metrics):
        for i, method in enumerate(c.methods):  # colour by run order: the same method, the same colour
            pts = sorted(c.curves[m].get(method, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=method, color=f"C{i}")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("batch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{c.run_id}: per-batch figures by batch index", fontsize=11)
    return _png(fig)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:2px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px;background:#fafafa}
.card .n{font-size:22px;font-weight:600} .card .l{font-size:12px;color:#666}
table{border-collapse:collapse;font-size:13px;margin:8px 0;width:100%}
td:first-child{white-space:nowrap}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#137333} .bad{color:#c5221f;font-weight:600} .flat{color:#888}
.status-applied{color:#137333} .status-rolled_back,.status-rejected,.status-failed{color:#c5221f;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.empty{color:#888;font-style:italic}
"""


def _e(v: Any) -> str:
    return html.escape(_fmt(v))


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    head = "".join(f'<th class="num">{html.escape(h)}</th>' if i in numeric else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_comparisons(runs: list[Comparison]) -> list[str]:
    parts = ["<h2>Method comparisons</h2>"]
    if not runs:
        return parts + ['<p class="empty">no <code>kedit compare</code> runs recorded</p>']
    parts.append(f"<p class='meta'>The {len(runs)} most recent <code>kedit compare</code> run(s), newest first: "
                 f"figures after each method's last batch. {html.escape(LEGEND)}</p>")
    for c in runs:
        columns = c.columns()
        when = f"{c.started:%Y-%m-%d %H:%M}" if isinstance(c.started, datetime) else "?"
        parts.append(f"<h3>{html.escape(c.run_id)}</h3>")
        parts.append(f"<p class='meta'>started {when} · {html.escape(c.status or '?')}</p>")
        heads = ["method"] + ["s/edit" if m == "seconds_per_edit" else m for m, _ in columns]
        rows = [[html.escape(cell) for cell in _compare_cells(c, m, columns)] for m in c.methods]
        parts.append(_table(heads, rows, numeric=set(range(1, len(heads)))))
        png = plot_comparison_curves(c)
        parts.append(f"<img alt='{html.escape(c.run_id)} per batch' src='data:image/png;base64,{png}'>" if png
                     else '<p class="empty">no per-batch figures</p>')
    return parts


def render_html(data: ReportData) -> str:
    c = data.counts
    cases, changes, versions, batches = (c.get(k, {}) for k in ("cases", "changes", "versions", "batches"))
    cards = [
        ("model versions", sum(versions.values())),
        ("edits applied", cases.get("applied", 0)),
        ("edits rejected", cases.get("rejected", 0)),
        ("edits filtered", cases.get("filtered", 0) + changes.get("filtered", 0)),
        ("changes quarantined", changes.get("quarantined", 0)),
        ("batches rolled back", batches.get("rolled_back", 0)),
        ("edits pending", cases.get("pending", 0)),
        ("pending over the edit budget", data.backlog.get("over_budget", 0)),
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>kedit drift report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>kedit drift report</h1>",
        f"<div class='meta'>generated {data.generated:%Y-%m-%d %H:%M} UTC · ledger {html.escape(data.ledger)}"
        + (f" · since {data.since:%Y-%m-%d %H:%M}" if data.since else "")
        + " · live: "
        + html.escape(", ".join(f"v{r['version_id']} ({r.get('base_spec') or '?'})" for r in data.live) or "none")
        + "</div>",
        "<div class='cards'>"
        + "".join(f"<div class='card'><div class='n'>{n}</div><div class='l'>{html.escape(l)}</div></div>" for l, n in cards)
        + "</div>",
        "<h2>Metrics now vs base vs last week</h2>",
        f"<p class='meta'>{html.escape(LEGEND)}</p>",
    ]
    by_method: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in data.summary:
        by_method[r["method"] or "-"][r["metric"]] = r
    if not by_method:
        parts.append('<p class="empty">no metrics recorded yet</p>')
    for method, rows in sorted(by_method.items()):
        table_rows = []
        for m in _metric_order(set(rows)):
            r = rows[m]
            db_, kb = _change(m, r["now"], r["base"])
            dw, kw = _change(m, r["now"], r["last_week"])
            table_rows.append([html.escape(m), _e(r["now"]), _e(r["base"]), f"<span class='{kb}'>{db_}</span>",
                               _e(r["last_week"]), f"<span class='{kw}'>{dw}</span>", _e(r["n"])])
        parts.append(f"<h3>{html.escape(method)}</h3>")
        parts.append(_table(["metric", "now", "base", "Δ vs base", "last week", "Δ vs last week", "accepted checks"],
                            table_rows, numeric={1, 2, 3, 4, 5, 6}))
    for title, png in (("Over model versions", plot_over_versions(data)), ("Over time", plot_over_time(data))):
        parts.append(f"<h2>{title}</h2>")
        parts.append(f"<img alt='{title}' src='data:image/png;base64,{png}'>" if png else '<p class="empty">no data</p>')
    parts += _html_comparisons(comparisons(data))
    parts.append("<h2>Batches</h2>")
    parts.append(_table(
        ["batch", "method", "run", "attempt", "cases", "status", "version", "reason"],
        [[_e(b["batch_id"]), _e(b["method"]), _e(b["run_id"]), _e(b["attempt"]), _e(b["n_cases"]),
          f"<span class='status-{html.escape(str(b['status']))}'>{_e(b['status'])}</span>", _e(b["version_id"]),
          _e(b["reason"])] for b in reversed(data.batches[-200:])],
        numeric={3, 4, 6},
    ))
    parts.append("<h2>Worst-hit known facts and locality probes</h2>")
    parts.append("<p class='meta'>Score: token agreement with the base model (locality) or token accuracy "
                 "(known facts) on the latest accepted check; 1.0 = untouched.</p>")
    parts.append(_table(
        ["kind", "prompt", "expected", "latest", "worst", "worst after batch", "checks"],
        [[_e(p["kind"]), _e(p["prompt"]), _e(p["expected"]), _e(p["latest"]), _e(p["worst"]), _e(p["worst_batch"]),
          _e(p["checks"])] for p in data.worst_probes],
        numeric={3, 4, 6},
    ))
    parts.append("<h2>Filtered, quarantined and rejected edits</h2>")
    parts.append(_table(
        ["what", "id", "subject", "relation", "status", "reason", "when"],
        [[_e(f["what"]), _e(f["id"]), _e(f["subject"]), _e(f["relation"]), _e(f["status"]), _e(f["reason"]),
          _e(f"{f['happened']:%Y-%m-%d %H:%M}" if isinstance(f["happened"], datetime) else f["happened"])] for f in data.filtered],
    ))
    for n in data.notes:
        parts.append(f"<p class='meta'>note: {html.escape(n)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
