"""`kedit quarantine list|release|reject` through the real command line (the `kedit` entry
point in a subprocess, so errors are seen as an operator sees them) on a DuckDB ledger on
disk, filled by the real nightly flow (Prefect, tiny-llama, the recorded week replayed from
127.0.0.1).

The week's 2024-05-05 holds a place of birth "Bitche" (a town in Moselle) that the profanity
tripwire holds back: the operator releases it and the next run applies it. 2024-05-03 holds
real profanity (Veronica Roth's birth name replaced by a new account): rejected for good.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

import tests.flows.flowkit  # noqa: F401  (registers the `nudge` test editor)
from connectors.replay import ReplayServer
from flows.demo import RECORDED_WEEK
from storage import ledger, quarantine_store, wikidata_store
from storage.db import open_db
from tests.flows.conftest import flow_settings

REPO = Path(__file__).resolve().parents[2]
BITCHE, PROFANITY = 2150000306, 2150000111


def kedit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDIT_OPERATOR": "night-shift"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def week():
    with ReplayServer(RECORDED_WEEK) as url:
        yield url


def _night(url: str, day: int, hours: float = 24) -> dict:
    from flows.prefect_flows import nightly_update

    return nightly_update(window_end=datetime(2024, 5, day, tzinfo=timezone.utc), window_hours=hours,
                          settings=flow_settings(url, batch_size=8))


def _change(db, revid: int) -> dict:
    return next(r for r in wikidata_store.fact_change_rows(db) if r["revid"] == revid)


def test_an_operator_lists_releases_and_rejects_quarantined_changes(prefect_api, ledger_path, week):
    _night(week, 6, hours=72)  # the first run reads [05-03, 05-06): both quarantined changes
    db = open_db(ledger_path)
    bitche, profanity = _change(db, BITCHE), _change(db, PROFANITY)
    assert bitche["status"] == profanity["status"] == "quarantined"
    assert bitche["reason"] == "value replaced with profanity: 'Bitche'"

    listing = kedit("quarantine", "list", "--db", str(ledger_path))
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert out.startswith("2 changes in quarantine")
    assert f"{bitche['change_id']}  Lena Hartmann (Q999000101)  P19  added  - -> Bitche (Q999000107)" in out
    assert f"revision {BITCHE} by Stadtchronist at 2024-05-05 16:20:00: value replaced with profanity: 'Bitche'" in out
    assert f"{profanity['change_id']}  Veronica Roth (Q328212)  P1477" in out and "by Xyzzy2024" in out

    # Bad input: one line on stderr, no traceback, nothing written.
    for args, says in [
        (["release", "0123456789abcdef"], "error: no fact change '0123456789abcdef' in the ledger"),
        (["reject", "abc"], "error: change id 'abc' is too short"),
        (["release", bitche["change_id"], "0123456789abcdef"], "error: no fact change '0123456789abcdef'"),
    ]:
        bad = kedit("quarantine", *args, "--reason", "x", "--db", str(ledger_path))
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert bad.stderr.startswith(says) and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    missing_reason = kedit("quarantine", "release", bitche["change_id"], "--db", str(ledger_path))
    assert missing_reason.returncode == 2 and "--reason" in missing_reason.stderr
    assert quarantine_store.decision_rows(db) == [] and _change(db, BITCHE)["status"] == "quarantined"

    # Release (by a unique prefix): back to 'accepted', the decision in the ledger.
    released = kedit("quarantine", "release", bitche["change_id"][:8], "--reason", "Bitche is a town in Moselle",
                     "--db", str(ledger_path))
    assert released.returncode == 0, released.stderr
    assert released.stdout.startswith(f"released {bitche['change_id']}: the next run makes an edit case of it")
    assert _change(db, BITCHE)["status"] == "accepted"
    # Reject (the operator named by --by).
    rejected = kedit("quarantine", "reject", profanity["change_id"], "--reason", "vandalism", "--by", "alice",
                     "--db", str(ledger_path))
    assert rejected.returncode == 0, rejected.stderr
    after = _change(db, PROFANITY)
    assert after["status"] == "rejected"
    assert after["reason"] == "rejected by alice: vandalism (quarantined: value replaced with profanity: 'Veronica Fuckface')"
    decisions = {d["change_id"]: d for d in quarantine_store.decision_rows(db)}
    assert {k: (d["decision"], d["decided_by"], d["reason"]) for k, d in decisions.items()} == {
        bitche["change_id"]: ("released", "night-shift", "Bitche is a town in Moselle"),
        profanity["change_id"]: ("rejected", "alice", "vandalism"),
    }
    assert decisions[bitche["change_id"]]["quarantine_reason"] == "value replaced with profanity: 'Bitche'"
    # A decided change cannot be decided again.
    twice = kedit("quarantine", "reject", bitche["change_id"], "--reason", "changed my mind", "--db", str(ledger_path))
    assert twice.returncode == 2
    assert twice.stderr.strip() == (f"error: change {bitche['change_id']} is not in quarantine: its status is "
                                    "'accepted' (released by night-shift)")

    # The next run (nothing new to read) makes an edit case of the released change and applies it.
    night = _night(week, 6)
    assert night["windows"] == [] and night["cases"]["new_cases"] == 1 and night["edits"]["applied_cases"] == 1
    assert _change(db, BITCHE)["status"] == "cased"
    applied = [c for c in ledger.get_cases(db, status="applied") if c.meta.get("revid") == BITCHE]
    assert [(c.question, c.target_new) for c in applied] == [("Where was Lena Hartmann born?", "Bitche")]
    assert _change(db, PROFANITY)["status"] == "rejected"  # never read again

    everything = kedit("quarantine", "list", "--all", "--db", str(ledger_path))
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.startswith("0 changes in quarantine, 2 decided")
    assert "released by night-shift at " in everything.stdout and ": Bitche is a town in Moselle (status now: cased)" \
        in everything.stdout
    assert "rejected by alice at " in everything.stdout and "(status now: rejected)" in everything.stdout
