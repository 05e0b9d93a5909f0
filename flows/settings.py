"""Pipeline settings: one dataclass, filled from defaults, then `KEDIT_*` environment
variables, then explicit arguments (flow parameters / CLI options)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

WIKIDATA_API = "https://www.wikidata.org/w/api.php"


@dataclass
class PipelineSettings:
    model: str = "smollm2"
    method: str = "alphaedit"
    batch_size: int = 10
    # Wikidata
    endpoint: str = WIKIDATA_API
    user_agent_contact: str = "kedit-operator@example.org"
    rate_limit_per_s: float = 5.0
    settle_hours: float = 48.0  # only take changes that survived this long (reverts filtered)
    # Nightly windows continue from a cursor in the ledger (flows/windows.py); one run reads
    # at most this many hours of edits and starts no new day once this many fact changes
    # were accepted (None: no bound); the rest waits for the next run.
    max_span_hours: float | None = 72.0
    max_changes_per_run: int | None = None
    allow_bots: bool = True
    allow_anonymous: bool = False
    # Serving
    server_url: str | None = None
    admin_token: str | None = None
    # Prefect retries of network steps (Wikidata, the server): one delay per retry
    network_retry_delays_s: list[float] = field(default_factory=lambda: [10.0, 60.0, 300.0])
    # Regression gate
    full_check_every: int = 5
    # One writer per ledger: how long a run waits for another that holds the ledger's lock
    # (0: fail at once, naming the other run)
    lock_wait_s: float = 0.0
    # Schedules
    nightly_cron: str = "0 2 * * *"
    editor_overrides: dict[str, Any] = field(default_factory=dict)  # EditorConfig fields
    gate_overrides: dict[str, Any] = field(default_factory=dict)  # GateConfig fields

    @classmethod
    def from_env(cls, **overrides: Any) -> PipelineSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = os.environ.get(f"KEDIT_{f.name.upper()}")
            if env is None or f.name.endswith("_overrides") or f.name == "network_retry_delays_s":
                continue
            values[f.name] = _coerce(env, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("admin_token", None)  # never stored in the ledger
        return d


def _coerce(raw: str, type_name: Any) -> Any:
    t = str(type_name)
    if "bool" in t:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "int" in t and "float" not in t:
        return int(raw)
    if "float" in t:
        return float(raw)
    return raw
