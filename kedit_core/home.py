"""Where kedit keeps its files (the ledger, the model cache, deltas, key statistics,
reports): a module of its own, so storage and file helpers can find the folder without
importing the torch-loading model module."""
from __future__ import annotations

import os
from pathlib import Path

from kedit_core.errors import KeditError


def kedit_home(create: bool = True) -> Path:
    """The folder for kedit's DuckDB file, model cache, key statistics and reports
    (created unless `create` is False: read-only commands never create it)."""
    env = os.environ.get("KEDIT_HOME")
    if env:
        home = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        home = Path(user_cache_dir("kedit"))
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeditError(f"cannot create the kedit home {home}: {exc.strerror or exc} (check KEDIT_HOME)") from exc
    return home


def default_ledger_path(create: bool = True) -> Path:
    """KEDIT_DB if set (e.g. the demo's own ledger), else kedit.duckdb in the kedit home
    (which is created unless `create` is False). Here rather than in storage because the
    artifacts the ledger records (deltas, editor states) live beside it."""
    env = os.environ.get("KEDIT_DB")
    if env:
        return Path(env).expanduser()
    return kedit_home(create=create) / "kedit.duckdb"
