"""An editor from `key=value` settings, as `--set` gives them on every command and in the
benchmarks: one parser, so a setting means the same thing everywhere."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, lists, true/null),
    `a,b,c` of integers as a list (layers=3,4,5), else kept as strings."""
    from kedit_core.errors import KeditError

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise KeditError(f"--set {pair!r}: expected key=value, e.g. --set layers=3,4,5")
        key, raw = pair.split("=", 1)
        key = key.strip()
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            parts = raw.split(",")
            value = [int(p) for p in parts] if all(p.strip().lstrip("-").isdigit() for p in parts) else raw
        out[key] = value
    return out


def editor_from_settings(method: str, pairs: list[str], label: str | None = None) -> Any:
    """The editor `method` with the `--set` pairs applied. A bad setting (unknown name,
    wrong value) is one KeditError naming it, raised before any work starts."""
    from kedit_core.editors import get_editor
    from kedit_core.errors import KeditError

    try:
        return get_editor(method, parse_settings(pairs))
    except (ValueError, TypeError) as exc:
        raise KeditError(f"{label}: {exc}" if label else str(exc)) from exc


def settings_file(path: str | Path, method: str) -> list[str]:
    """Per-model editor settings kept in a file (`--config FILE`, as EasyEdit's hparams files
    are): TOML or YAML, top-level keys for any method plus an optional table per method
    (`[alphaedit]`, `[memit]`, ...) whose keys win for that method. Returned as `key=value`
    pairs to put before the command's own `--set` pairs, which win over the file."""
    from kedit_core.editors import available_editors
    from kedit_core.errors import KeditError

    p = Path(path).expanduser()
    if not p.is_file():
        raise KeditError(f"--config {p}: no such file")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise KeditError(f"--config {p}: give a .toml or .yaml file")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(p.read_text())
        else:
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError: both one line here
        raise KeditError(f"--config {p}: not valid {p.suffix[1:].upper()}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise KeditError(f"--config {p}: expected settings (key = value), got a {type(data).__name__}")
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(available_editors()))
    if unknown:
        raise KeditError(f"--config {p}: tables {unknown} name no editing method; known: {sorted(available_editors())}")
    merged = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **tables.get(method, {})}
    return [f"{k}={json.dumps(v)}" for k, v in merged.items()]
