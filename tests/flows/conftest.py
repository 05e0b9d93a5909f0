"""Fixtures shared by the flow tests: one Prefect test server per session (a second one per
test module would double the start-up) and a ledger per test."""
from __future__ import annotations

import pytest

from connectors.replay import ReplayServer
from flows.services import steps
from tests.conftest import WIKIDATA_DAY


def flow_settings(url: str, batch_size: int, **extra) -> dict:
    """Pipeline settings of the flow tests: tiny-llama with the instant `nudge` editor, the
    replay server at `url` without rate limit, and a regression gate that keeps what the
    editor wrote (the flows, not the editing, are under test)."""
    return {"model": "tiny-llama", "method": "nudge", "endpoint": url, "rate_limit_per_s": 0,
            "batch_size": batch_size, "gate_overrides": {"take_floor": 0.0}, **extra}


@pytest.fixture
def replay():
    """The recorded Wikidata day served on 127.0.0.1 (real HTTP); yields its URL."""
    with ReplayServer(WIKIDATA_DAY) as url:
        yield url


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def ledger_path(kedit_home, monkeypatch):
    path = kedit_home / "flows.duckdb"
    monkeypatch.setenv("KEDIT_DB", str(path))
    steps.forget_live_models()
    yield path
    steps.forget_live_models()
