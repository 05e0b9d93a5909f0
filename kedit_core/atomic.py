"""Atomic file and folder writes, and removing the temporary files a killed writer left behind.

Every file kedit reads back (deltas, editor states, caches, suites, reports) is written
to a temporary name beside its target and renamed over it, so a reader sees the old file
or the new one, never a truncated one. The temporary name carries the writer's pid
(`NAME.<pid>.tmp`): `remove_stale_tmp` removes those whose process is gone (and any
`*.tmp` older than an hour), and is called when a pipeline or the server starts.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kedit_core.home import kedit_home

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
STALE_AFTER_S = 3600.0  # a *.tmp untouched this long belongs to no running write
_PID_TMP = re.compile(r"\.(\d+)\.tmp$")


def tmp_path_for(path: str | os.PathLike[str]) -> Path:
    """The temporary name `path` is written under before the rename (same folder, so the
    rename is atomic; the pid keeps two processes writing one target apart)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it replaces
    `path` in one rename, on failure it is removed and `path` is left as it was.

        with atomic_target(p) as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like `atomic_target` for a folder: yield an empty temporary folder beside `path` to
    fill; on success it replaces `path` by renames (an existing `path` is first moved aside
    and removed only once the new one is in place), on failure it is removed and `path` is
    left as it was. A reader sees the old folder or the new one, never a half-written one."""
    path = Path(path)
    tmp = tmp_path_for(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.{os.getpid()}.old{TMP_SUFFIX}")
        _remove(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def is_stale_tmp(path: Path, now: float | None = None, stale_after_s: float = STALE_AFTER_S,
                 tagged_only: bool = False) -> bool:
    """A temporary file no running write can still be using: its writer's pid is gone,
    or (an untagged *.tmp, or a pid reused since) it has not been touched for an hour.
    `tagged_only`: only names this module makes (NAME.<pid>.tmp) are considered."""
    if not path.name.endswith(TMP_SUFFIX):
        return False
    m = _PID_TMP.search(path.name)
    if m is None and tagged_only:
        return False
    if m is not None and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
        return True
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age > stale_after_s


def remove_stale_tmp(*roots: str | os.PathLike[str] | None, stale_after_s: float = STALE_AFTER_S,
                     recursive: bool = True, tagged_only: bool = False) -> list[Path]:
    """Remove stale `*.tmp` files (and folders) under each existing root; returns them.
    `recursive=False` looks in the roots themselves only; `tagged_only` removes only the
    pid-tagged names this module makes (for folders kedit shares with other programs)."""
    removed: list[Path] = []
    now = time.time()
    seen: set[Path] = set()
    for root in roots:
        if root is None:
            continue
        root = Path(root)
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for folder, dirs, files in os.walk(root):
            for name in [d for d in dirs if d.endswith(TMP_SUFFIX)]:
                p = Path(folder) / name
                if is_stale_tmp(p, now, stale_after_s, tagged_only):
                    _remove(p)
                    removed.append(p)
                    dirs.remove(name)
            for name in files:
                p = Path(folder) / name
                if name.endswith(TMP_SUFFIX) and is_stale_tmp(p, now, stale_after_s, tagged_only):
                    _remove(p)
                    removed.append(p)
            if not recursive:
                break
    if removed:
        log.warning("removed %d leftover temporary file(s) of interrupted writes: %s", len(removed),
                    ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


def clean_kedit_home(ledger_folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """`remove_stale_tmp` over the kedit home (model cache, deltas, caches: kedit's own
    folder, searched throughout) and, when the ledger lives elsewhere, its folder and the
    reports folder beside it (not searched deeper, and only kedit's pid-tagged temp names:
    that folder may be shared with other programs). Never creates the home."""
    home = kedit_home(create=False)
    removed = remove_stale_tmp(home)
    if ledger_folder is not None:
        folder = Path(ledger_folder)
        inside_home = home.exists() and folder.resolve().is_relative_to(home.resolve())
        if not inside_home:
            removed += remove_stale_tmp(folder, folder / "reports", recursive=False, tagged_only=True)
    return removed
