"""Fixtures shared by the flow tests: one Prefect test server per session (a second one per
test module would double the start-up) and a ledger per test."""
from __future__ import annotations

import pytest

from flows import steps


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
