"""One writer per ledger: an exclusive lock file beside the DuckDB file.

Every run that writes the ledger's story (the nightly pipeline, a backfill, a comparison,
`kedit demo`, `kedit rollback`) holds `<ledger>.lock` from start to end. DuckDB's own file
lock only serialises single transactions (kedit's connections are short on purpose), so
without this two runs interleave their batches, recover each other's work in progress and
record versions on the same parent.

Why `fcntl.flock` and not the `filelock` package: the kernel drops a flock when the process
that holds it dies, however it dies (SIGKILL, OOM killer), so a crash can never leave the
ledger locked; "recovering a stale lock" is then only noticing, and logging, that the last
holder never released it. filelock's Unix lock is this same call; what it adds (a
per-thread re-entrancy counter, Windows) kedit does not need, and it keeps no record of who
holds the lock, which the error message must name. That record (pid, host, start, kind) is
JSON inside the lock file itself, written once the lock is taken and emptied on release, so
a non-empty file whose lock is free is the trace of a run that crashed.

Re-entrant within one thread (a CLI command takes the lock, then calls the Prefect flow,
which takes it again); another thread of the same process is refused like another process.
POSIX only (Linux, macOS), like the rest of kedit's runtime.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from storage.db import StorageError

log = logging.getLogger("kedit.lock")


class LedgerLocked(StorageError):
    """Another run holds the ledger; the message names it (one line)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a ledger: enough to find the process and judge whether it lives."""

    pid: int
    host: str
    started: str  # when the lock was taken, ISO UTC
    kind: str  # nightly | backfill | compare | demo | rollback | ...
    proc_start: str | None = None  # the OS's start time of the process, so a reused pid is not taken for it

    def describe(self) -> str:
        return f"pid {self.pid}, host {self.host}, started {self.started}, kind {self.kind}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["kind"]), d.get("proc_start"))
        except (ValueError, KeyError, TypeError):
            return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux's /proc), or None
    where the OS does not say. Together with the pid it names one process, not a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def this_process(kind: str = "") -> Holder:
    pid = os.getpid()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Holder(pid, socket.gethostname(), started, kind, process_start(pid))


def process_alive(pid: int | None, host: str | None, proc_start: str | None = None) -> bool | None:
    """Whether the process is still running: True / False, or None when it ran on another
    host (nothing here can tell)."""
    if pid is None:
        return False
    if host and host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if proc_start is not None:
        now = process_start(int(pid))
        if now is not None and now != proc_start:
            return False  # the pid was reused by a newer process
    return True


def lock_path(db_path: str | os.PathLike[str]) -> Path:
    return Path(str(db_path) + ".lock")


@dataclass
class _Held:
    fd: int
    depth: int
    thread: int
    holder: Holder


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def held_by_this_process(db_path: str | os.PathLike[str]) -> Holder | None:
    """The holder record if this process holds the ledger's lock."""
    with _GUARD:
        held = _HELD.get(str(lock_path(db_path).resolve()))
    return held.holder if held else None


def read_holder(path: Path) -> Holder | None:
    """The holder record in a lock file (None if empty, absent or half written)."""
    for _ in range(3):  # a record read while its writer is writing it: look again shortly
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None
        if not text.strip():
            return None
        holder = Holder.from_json(text)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def ledger_lock(db_path: str | os.PathLike[str], kind: str, wait_s: float = 0.0,
                poll_s: float = 0.5) -> Iterator[Holder]:
    """Hold the ledger's writer lock for the block. Waits up to `wait_s` seconds for another
    run to finish, then raises `LedgerLocked` naming it."""
    path = lock_path(db_path)
    key = str(path.resolve())
    held = _enter_again(key)
    if held is None:
        held = _acquire(path, key, kind, wait_s, poll_s)
    try:
        yield held.holder
    finally:
        _leave(key)


def _enter_again(key: str) -> _Held | None:
    """Re-enter a lock this thread holds (the CLI took it before calling the flow)."""
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.thread == threading.get_ident():
            held.depth += 1
            return held
    return None


def _acquire(path: Path, key: str, kind: str, wait_s: float, poll_s: float) -> _Held:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(wait_s, 0.0)
    while True:
        with _GUARD:
            if key not in _HELD:  # not held by another thread of this process
                fd = _try_flock(path)
                if fd is not None:
                    held = _Held(fd, 1, threading.get_ident(), _claim(fd, path, kind))
                    _HELD[key] = held
                    return held
        if time.monotonic() >= deadline:
            raise LedgerLocked(_held_message(path, wait_s))
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.01)))


def _try_flock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim(fd: int, path: Path, kind: str) -> Holder:
    """Write our holder record; a record already there is a run that died holding the lock."""
    previous = read_holder(path)
    if previous is not None:
        log.warning("took over the ledger lock %s from a run that ended without releasing it (%s; process %s)",
                    path, previous.describe(), _liveness(previous))
    holder = this_process(kind)
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.to_json().encode("utf-8"), 0)
    return holder


def _liveness(holder: Holder) -> str:
    alive = process_alive(holder.pid, holder.host, holder.proc_start)
    return {True: "still running", False: "no longer running", None: "on another host"}[alive]


def _leave(key: str) -> None:
    with _GUARD:
        held = _HELD[key]
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[key]
        try:
            os.ftruncate(held.fd, 0)  # an empty file: released cleanly, nothing to take over
            fcntl.flock(held.fd, fcntl.LOCK_UN)
        finally:
            os.close(held.fd)


def _held_message(path: Path, wait_s: float) -> str:
    holder = read_holder(path)
    waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
    if holder is None:
        return f"another run (starting, not yet named) holds the ledger {path}{waited}"
    if process_alive(holder.pid, holder.host, holder.proc_start) is False:
        # flock outlives its taker only in a child that inherited the descriptor (a fork).
        return (f"another run ({holder.describe()}) holds the ledger {path}{waited}; that pid is gone, "
                "so a process it forked still holds the lock")
    return f"another run ({holder.describe()}) holds the ledger {path}{waited}"
