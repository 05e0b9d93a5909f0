"""An editor from `key=value` settings, as `--set` gives them on every command and in the
benchmarks: one parser, so a setting means the same thing everywhere. A setting inside a
group has a dotted name (`--set targets.steps=50`, `--set update_gate.per_batch=true`;
a nested table in a config file)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, lists, true/null),
    `a,b,c` of integers as a list (layers=3,4,5), else kept as strings. A dotted key is a
    setting inside a group: `targets.steps=50` gives {"targets": {"steps": 50}}."""
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
        group, dot, name = key.partition(".")
        if not dot:
            out[key] = value
        elif not group or not name or "." in name:
            raise KeditError(f"--set {pair!r}: a setting is NAME or GROUP.NAME, e.g. --set targets.steps=50")
        elif not isinstance(out.setdefault(group, {}), dict):
            raise KeditError(f"--set {pair!r}: {group} is a group of settings; set {group}.NAME, not {group}")
        else:
            out[group][name] = value
    return out


def merged(*settings: dict[str, Any]) -> dict[str, Any]:
    """Settings dicts merged left to right, a group key by key: merged(FAST, {"targets":
    {"steps": 8}}) keeps FAST's other target settings (a plain {**FAST, ...} would not)."""
    out: dict[str, Any] = {}
    for d in settings:
        for key, value in d.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = dict(value) if isinstance(value, dict) else value
    return out


def editor_from_settings(method: str, pairs: list[str], label: str | None = None) -> Any:
    """The editor `method` with the `--set` pairs applied. A bad setting (unknown name,
    wrong value) is one KeditError naming it, raised before any work starts."""
    from kedit_core.editors import EDITORS, get_editor
    from kedit_core.errors import KeditError

    try:
        if method not in EDITORS:
            return get_editor(method)  # the one-line error naming the known methods
        return get_editor(method, EDITORS[method].config_class.from_settings(parse_settings(pairs)))
    except (ValueError, TypeError) as exc:
        raise KeditError(f"{label}: {exc}" if label else str(exc)) from exc


def settings_file(path: str | Path, method: str) -> list[str]:
    """Per-model editor settings kept in a file (`--config FILE`, as EasyEdit's hparams files
    are): TOML or YAML, top-level keys for any method plus an optional table per method
    (`[alphaedit]`, `[memit]`, ...) whose keys win for that method. A group of settings is a
    nested table (`[targets]`, `[alphaedit.update_gate]`). Returned as `key=value` pairs
    (`targets.steps=50`) to put before the command's own `--set` pairs, which win over the file."""
    from kedit_core.editors import EDITORS, available_editors
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
    methods = set(available_editors())
    groups = {g for name in methods for g in EDITORS[name].config_class.groups()}
    unknown = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in methods | groups)
    if unknown:
        raise KeditError(f"--config {p}: tables {unknown} name no editing method and no group of settings; "
                         f"methods: {sorted(methods)}, groups: {sorted(groups)}")
    merged = _dotted({k: v for k, v in data.items() if k not in methods})
    own = data.get(method, {})
    if not isinstance(own, dict):
        raise KeditError(f"--config {p}: {method} is a method; give its settings as a table [{method}]")
    merged.update(_dotted(own))
    return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


def _dotted(table: dict[str, Any]) -> dict[str, Any]:
    """A table's settings by dotted name: {"targets": {"steps": 50}} -> {"targets.steps": 50}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
