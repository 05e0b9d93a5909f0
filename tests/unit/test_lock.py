"""The ledger's writer lock (storage/lock.py) with real processes: a run holding it refuses
another with a one-line message naming it, a waiting run gets it when the holder ends, a
holder killed with SIGKILL leaves a lock that the next run takes over (and logs), and
`kedit rollback` refuses to run while another run holds the ledger."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.lock import LedgerLocked, held_by_this_process, ledger_lock, lock_path, read_holder

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys\n"
    "from storage.lock import ledger_lock\n"
    "with ledger_lock(sys.argv[1], sys.argv[2]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.read()\n"  # holds until the test closes our stdin (or kills us)
)


class Holder:
    """Another process holding the ledger's lock until released or killed."""

    def __init__(self, db_path: Path, kind: str = "nightly"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db_path), kind], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def test_a_held_ledger_refuses_another_run_naming_the_holder(tmp_path):
    db_path = tmp_path / "kedit.duckdb"
    with Holder(db_path, "backfill") as other:
        with pytest.raises(LedgerLocked) as err:
            with ledger_lock(db_path, "nightly"):
                pass
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"another run (pid {other.proc.pid}, host ")
        assert ", kind backfill) holds the ledger " in msg and msg.endswith(str(lock_path(db_path)))
        assert held_by_this_process(db_path) is None
        other.release()
    assert read_holder(lock_path(db_path)) is None  # a clean release leaves no holder record
    with ledger_lock(db_path, "nightly") as me:
        assert me.pid == os.getpid() and read_holder(lock_path(db_path)) == me


def test_a_waiting_run_gets_the_ledger_when_the_holder_finishes(tmp_path):
    db_path = tmp_path / "kedit.duckdb"
    with Holder(db_path) as other:
        threading.Timer(1.0, other.proc.stdin.close).start()  # the other run finishes in a second
        t0 = time.monotonic()
        with ledger_lock(db_path, "nightly", wait_s=60, poll_s=0.1) as me:
            waited = time.monotonic() - t0
            assert read_holder(lock_path(db_path)) == me
        assert other.proc.wait(timeout=30) == 0
    assert 0.5 < waited < 30
    with Holder(db_path):
        with pytest.raises(LedgerLocked, match=r"\(waited 0\.3 s\)"):
            with ledger_lock(db_path, "nightly", wait_s=0.3, poll_s=0.1):
                pass


def test_a_lock_left_by_a_killed_run_is_taken_over_and_logged(tmp_path, caplog):
    db_path = tmp_path / "kedit.duckdb"
    with Holder(db_path, "backfill") as crashed:
        dead_pid = crashed.proc.pid
        crashed.kill()  # SIGKILL: no clean-up ran, its holder record is still in the file
    left = read_holder(lock_path(db_path))
    assert left is not None and left.pid == dead_pid and left.kind == "backfill"
    with caplog.at_level(logging.WARNING, logger="kedit.lock"):
        with ledger_lock(db_path, "nightly") as me:
            assert read_holder(lock_path(db_path)) == me
    [record] = [r for r in caplog.records if "took over" in r.getMessage()]
    assert f"pid {dead_pid}" in record.getMessage() and "no longer running" in record.getMessage()


def test_the_lock_is_reentrant_in_one_thread_and_refused_to_another(tmp_path):
    db_path = tmp_path / "kedit.duckdb"
    errors: list[str] = []

    def other_thread() -> None:
        try:
            with ledger_lock(db_path, "compare"):
                errors.append("got it")
        except LedgerLocked as exc:
            errors.append(str(exc))

    with ledger_lock(db_path, "demo") as outer:
        with ledger_lock(db_path, "nightly") as inner:  # the CLI took it, then the flow takes it again
            assert inner == outer
        assert held_by_this_process(db_path) == outer  # still held after the inner block
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and errors[0].startswith(f"another run (pid {os.getpid()}") and "kind demo" in errors[0]
    assert held_by_this_process(db_path) is None


def test_rollback_while_another_run_holds_the_ledger_is_one_line_and_exit_2(tmp_path):
    from storage import ledger
    from storage.db import open_db

    db_path = tmp_path / "kedit.duckdb"
    db = open_db(db_path)
    base = ledger.ensure_base_version(db, "fp0", "tiny")
    v1 = ledger.add_version(db, base, "fp0", "tiny", "memit", None, None, None)
    cmd = [sys.executable, "-m", "flows.cli", "rollback", str(base), "--reason", "test", "--db", str(db_path)]
    with Holder(db_path, "nightly") as other:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr
        [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
        assert line.startswith(f"error: another run (pid {other.proc.pid}, host ") and "kind nightly" in line
        assert ledger.live_version(db, "fp0")["version_id"] == v1  # nothing rolled back
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ledger.live_version(db, "fp0")["version_id"] == base
