"""Shared fixtures. Every test gets its own KEDIT_HOME (a temp folder), so tests never touch
a user's ledger or cache; the embedded model's safetensors cache is shared per session
(building it takes ~20 s) by pointing at one session-wide folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DATA = REPO / "data"
WIKIDATA_DAY = DATA / "wikidata_day"  # one recorded day of Wikidata answers (see its SOURCES.md)
DAY_START, DAY_END = "2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kedit_session_home")


@pytest.fixture(autouse=True)
def kedit_home(tmp_path, monkeypatch, session_home) -> Path:
    home = tmp_path / "kedit_home"
    home.mkdir()
    # Share the session's embedded-model cache so only the first load pays for de-quantising.
    (session_home / "models").mkdir(exist_ok=True)
    (home / "models").symlink_to(session_home / "models", target_is_directory=True)
    monkeypatch.setenv("KEDIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def embedded_lm(session_home):
    """The real embedded model, loaded once per session (integration tests only)."""
    from kedit_core.model import load_model

    old = os.environ.get("KEDIT_HOME")
    os.environ["KEDIT_HOME"] = str(session_home)
    try:
        lm = load_model("smollm2", show_progress=False)
    finally:
        if old is None:
            os.environ.pop("KEDIT_HOME", None)
        else:
            os.environ["KEDIT_HOME"] = old
    return lm


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    """A tiny random model of each architecture the editors locate layers for."""
    from kedit_core.model import tiny_model

    return tiny_model(request.param, seed=0)


def subject_final_cases() -> list:
    """Cases whose prompt ends with the subject, so its last token directly predicts the
    answer: a tiny random model's attention is too diffuse to carry an edit made earlier in
    the prompt."""
    from kedit_core.types import EditCase

    return [
        EditCase(case_id=f"s{i}", subject=s, relation="r", prompt=f"Answer for {s}", target_new=t)
        for i, (s, t) in enumerate([("Zorbland", "Q"), ("Mivvy", "K"), ("Plonk", "W")])
    ]


def sharpen(lm) -> None:
    """Scale a tiny random model's final norm so an answer can become likely (its output is
    nearly uniform otherwise, and edits could not raise a token's probability much)."""
    import torch

    with torch.no_grad():
        norm = lm.model.base_model.norm if lm.arch == "llama" else lm.model.base_model.ln_f
        norm.weight.mul_(20)


@pytest.fixture
def tiny_llama():
    from kedit_core.model import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture
def tiny_gpt2():
    from kedit_core.model import tiny_model

    return tiny_model("gpt2", seed=0)


@pytest.fixture
def db(kedit_home):
    from storage.db import open_db

    return open_db(kedit_home / "test.duckdb")


@pytest.fixture
def server():
    """The recorded Wikidata day served on 127.0.0.1 by the replay server (real HTTP)."""
    from connectors.replay import ReplayServer

    srv = ReplayServer(WIKIDATA_DAY)
    srv.start()
    yield srv
    srv.stop()
