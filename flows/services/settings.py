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
    # Where the model runs and its weights' type (KEDIT_DEVICE / KEDIT_DTYPE; kedit_core/device.py)
    device: str = "cpu"
    dtype: str = "float32"
    method: str = "alphaedit"
    batch_size: int = 10
    # Wikidata
    endpoint: str = WIKIDATA_API
    # Wikimedia asks API clients for a contact in the User-Agent: KEDIT_CONTACT (an e-mail
    # or URL); None here lets the client read it (connectors/wikidata.py).
    user_agent_contact: str | None = None
    rate_limit_per_s: float = 5.0
    # The client does not trust the server (connectors/wikidata.py): a longer Retry-After is
    # waited this long, one HTTP request must be answered in full within the deadline, and a
    # bigger answer is refused.
    max_retry_after_s: float = 120.0
    request_deadline_s: float = 120.0
    max_body_bytes: int = 50 * 2**20
    settle_hours: float = 48.0  # only take changes that survived this long (reverts filtered)
    # What this deployment follows: "all", item ids ("Q42,Q64" or a list) or "sitelinks>=N"
    follow: str | list[str] = "all"
    # Nightly windows continue from a cursor in the ledger (flows/services/windows.py); one run reads
    # at most this many hours of edits and starts no new day once this many fact changes
    # were accepted (None: no bound); the rest waits for the next run.
    max_span_hours: float | None = 72.0
    max_changes_per_run: int | None = None
    allow_bots: bool = False  # the filter's own default too: one default everywhere
    allow_anonymous: bool = False
    # Edits applied per run at most (None or 0: no cap), oldest change first (then subject,
    # relation, case id); the rest stays pending for the next run and is in the report.
    max_edits_per_run: int | None = 500
    # Serving
    server_url: str | None = None
    admin_token: str | None = None
    # Another engine (flows/services/publish.py): after each nightly run the live version is exported
    # into this folder (KEDIT_PUBLISH_DIR, e.g. a llama-server --models-dir) and the engine told
    publish_dir: str | None = None
    publish_format: str = "gguf"  # gguf (llama.cpp) or hf (vLLM, TGI)
    publish_name: str = "kedit-live"  # the model's name in the engine
    publish_llama_server: str | None = None  # a llama.cpp router's URL: unload + load the model
    publish_command: str | None = None  # a shell command run after each new version
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
    gate_overrides: dict[str, Any] = field(default_factory=dict)  # RegressionGateConfig fields

    @classmethod
    def from_env(cls, **overrides: Any) -> PipelineSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = os.environ.get(f"KEDIT_{f.name.upper()}")
            if env is None or f.name.endswith("_overrides") or f.name == "network_retry_delays_s":
                continue
            values[f.name] = _coerce(env, f.type)
        if "user_agent_contact" not in values and os.environ.get("KEDIT_CONTACT"):
            values["user_agent_contact"] = os.environ["KEDIT_CONTACT"]  # the documented name
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        from kedit_core.device import check_names
        from kedit_core.filters import parse_follow

        parse_follow(self.follow)  # a bad scope fails here, in one line, before anything runs
        # unknown names fail here too; whether the device is present is checked where the
        # model loads (a scheduler may build settings for a worker on another machine)
        self.device, self.dtype = check_names(self.device, self.dtype)

    def wikidata_client(self) -> Any:
        """The Wikidata client these settings describe (endpoint, etiquette, limits)."""
        from connectors.wikidata import WikidataClient

        return WikidataClient(
            endpoint=self.endpoint, contact=self.user_agent_contact, rate_limit_per_s=self.rate_limit_per_s,
            max_retry_after_s=self.max_retry_after_s, deadline_s=self.request_deadline_s,
            max_body_bytes=self.max_body_bytes,
        )

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
