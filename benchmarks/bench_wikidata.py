"""How fast is the Wikidata path, and how many API requests does it cost per revision?

Builds a larger window from the recorded day (data/wikidata_day: real entity bodies,
constructed edits) by repeating its edits `--copies` times under new revision ids, serves it
from a loopback replay server in a *separate process* (so the server's own work does not
share this process's interpreter), and measures in this process:

1. baseline: `json.loads` of every revision body (the least any reader must do);
2. parse + diff: `parse_entity` + `diff_entities` of every (parent, revision) pair;
3. full ingestion: `ingest_window` (HTTP on 127.0.0.1, diff, filters, DuckDB on disk).

Prints rates, the ratios to the baseline, HTTP requests per revision, and what a day of
500k revisions would take at the measured rates (wall clock, and this process's CPU time,
which excludes the replay server's work standing in for the remote API's latency).

    python benchmarks/bench_wikidata.py --copies 40
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DAY = REPO / "data" / "wikidata_day"
DAY_REVISIONS = 500_000


def build_window(out: Path, copies: int) -> tuple[list[tuple[str, str]], int]:
    """Copy the day's edits `copies` times with fresh revids, spread over one day.
    Returns the (parent body, revision body) JSON text pairs and the revision count."""
    recs = {int(p.stem): json.loads(p.read_text()) for p in (DAY / "revisions").glob("*.json")}
    rows = [r for f in sorted(DAY.glob("recentchanges-*.json")) for r in json.loads(f.read_text())["query"]["recentchanges"]]
    edits = [r for r in rows if r["revid"] in recs and not recs[r["revid"]]["revision"].get("texthidden")]
    (out / "revisions").mkdir(parents=True)
    shutil.copy(DAY / "labels.json", out / "labels.json")
    shutil.copy(DAY / "users.json", out / "users.json")
    new_rows, pairs = [], []
    seconds_per_rev = 86400 / (copies * len(edits))
    n = 0
    for k in range(copies):
        for r in edits:
            revid, parent = 3_000_000_000 + 2 * n + 1, (3_000_000_000 + 2 * n if r["old_revid"] else 0)
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1714521600 + int(n * seconds_per_rev)))
            child = json.loads(json.dumps(recs[r["revid"]]))
            child["revision"].update(revid=revid, parentid=parent, timestamp=ts)
            (out / "revisions" / f"{revid}.json").write_text(json.dumps(child))
            parent_body = None
            if parent:
                par = json.loads(json.dumps(recs[r["old_revid"]]))
                par["revision"].update(revid=parent, parentid=0, timestamp="2024-04-01T00:00:00Z")
                (out / "revisions" / f"{parent}.json").write_text(json.dumps(par))
                parent_body = json.dumps(par["entity"])
            pairs.append((parent_body, json.dumps(child["entity"])))
            new_rows.append({**r, "revid": revid, "old_revid": parent, "rcid": 5_000_000_000 + n, "timestamp": ts})
            n += 1
    for i in range(0, len(new_rows), 500):  # the API's rclimit=max for normal users
        page = {"batchcomplete": True, "query": {"recentchanges": new_rows[i:i + 500]}}
        (out / f"recentchanges-{i // 500 + 1:04d}.json").write_text(json.dumps(page))
    return pairs, n


SERVER = """
import sys, time
sys.path.insert(0, {repo!r})
from connectors.replay import ReplayServer
srv = ReplayServer({folder!r}, page_size=500)
print(srv.start(), flush=True)
while True:
    time.sleep(3600)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=40, help="times the day's edits are repeated")
    args = ap.parse_args()

    from flows.services.ingest import ingest_window
    from connectors.wikidata import WikidataClient
    from kedit_core.diff import diff_entities, parse_entity
    from storage.db import open_db

    tmp = Path(tempfile.mkdtemp(prefix="bench_wikidata_"))
    proc = None
    try:
        pairs, n = build_window(tmp / "window", args.copies)
        texts = [t for pair in pairs for t in pair if t]

        t0 = time.perf_counter()
        for t in texts:
            json.loads(t)
        base_s = time.perf_counter() - t0
        base_rate = n / base_s  # revisions' bodies (both sides) decoded per second

        t0 = time.perf_counter()
        n_changes = 0
        for old, new in pairs:
            n_changes += len(diff_entities(parse_entity(old) if old else None, parse_entity(new)))
        diff_s = time.perf_counter() - t0
        diff_rate = n / diff_s

        proc = subprocess.Popen([sys.executable, "-c", SERVER.format(repo=str(REPO), folder=str(tmp / "window"))],
                                stdout=subprocess.PIPE, text=True)
        url = proc.stdout.readline().strip()
        runs = {}
        for prefetch in (False, True):  # same window, fresh ledgers, same process
            db = open_db(tmp / f"bench-{prefetch}.duckdb")
            client = WikidataClient(endpoint=url, rate_limit_per_s=None)
            c0, t0 = time.process_time(), time.perf_counter()
            report = ingest_window(client, db, "2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z", prefetch=prefetch)
            runs[prefetch] = (time.perf_counter() - t0, time.process_time() - c0, report, client.stats.http_s)
            assert report.revisions_new == n, report
        wall_s, cpu_s, report, _ = runs[True]
        own_s = runs[False][0] - runs[False][3]  # without prefetch, HTTP waits do not overlap our work

        def day(rate: float) -> str:
            return f"{DAY_REVISIONS / rate / 60:.1f} min"

        print(f"window: {n} revisions ({args.copies} copies of the recorded day's edits), "
              f"{sum(map(len, texts)) / 1e6:.1f} MB of entity JSON, {n_changes} fact changes")
        print(f"baseline json.loads of both bodies : {base_rate:9.0f} rev/s   (1.00x)")
        print(f"parse + diff                        : {diff_rate:9.0f} rev/s   "
              f"({base_s / diff_s:.2f}x baseline speed)   500k/day -> {day(diff_rate)}")
        print(f"ingest_window, wall clock           : {n / wall_s:9.0f} rev/s   "
              f"({base_s / wall_s:.2f}x baseline speed)   500k/day -> {day(n / wall_s)}")
        print(f"ingest_window without prefetch      : {n / runs[False][0]:9.0f} rev/s   "
              f"(prefetch is {runs[False][0] / wall_s:.2f}x faster)")
        print(f"ingest_window minus HTTP wait       : {n / own_s:9.0f} rev/s   "
              f"500k/day -> {day(n / own_s)} (no prefetch run, time inside HTTP calls removed)")
        print(f"ingest_window, this process's CPU   : {n / cpu_s:9.0f} rev/s   "
              f"500k/day -> {day(n / cpu_s)} (excludes the replay server's work)")
        print(f"HTTP requests: {report.requests} for {n} revisions = {report.requests / n:.4f} per revision "
              f"-> {report.requests / n * DAY_REVISIONS:.0f} requests for 500k revisions")
        print(f"outcomes: {report.changes_accepted} accepted, {report.changes_quarantined} quarantined, "
              f"{report.revisions_filtered} revisions filtered, {report.revisions_failed} failed")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
