"""An editor from `key=value` settings, as `--set` gives them on every command and in the
benchmarks: one parser, so a setting means the same thing everywhere."""
from __future__ import annotations

import json
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
