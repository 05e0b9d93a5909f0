"""The embedded model served for real on 127.0.0.1, asked through the official openai client."""
from __future__ import annotations

import pytest

from flows.services.serving import build_serving_state
from kedit_core.serving import BackgroundServer, create_app

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")


def test_served_embedded_model_knows_paris(embedded_lm, db):
    # The live version of a fresh ledger is the unedited base: nothing is applied, so the
    # shared session model is left exactly as it was.
    state = build_serving_state(embedded_lm, db)
    with BackgroundServer(create_app(state, None)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24
        )
    assert "Paris" in got.choices[0].message.content
    assert got.system_fingerprint == f"kedit-v{state.version_id}-{embedded_lm.fingerprint[:12]}"
