"""llama.cpp's own server serves what `kedit publish` hands it (issue 21, point 4): the
embedded model's base and then an edited version, exported as GGUF into a llama.cpp router's
models folder, the router told to reload through its API. Each reply equals transformers'
greedy reply from the same GGUF file, so the engine serves exactly the published weights.

Runs where llama.cpp's `llama-server` is installed (on PATH, or KEDIT_LLAMA_SERVER names
it; scripts/build_llama_server.sh builds one from the llama-cpp-python source package),
and skips elsewhere. ~2 min here."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests
import torch

from connectors.benchmarks import read_zsre
from flows.services.publish import publish_version
from kedit_core.artifacts import delta_dir
from kedit_core.editors import get_editor
from kedit_core.model import fingerprint_model
from storage import ledger
from storage.db import open_db
from tests.conftest import DATA

LLAMA_SERVER = os.environ.get("KEDIT_LLAMA_SERVER") or shutil.which("llama-server")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not LLAMA_SERVER, reason="llama.cpp's llama-server is not installed "
                       "(scripts/build_llama_server.sh builds one; or set KEDIT_LLAMA_SERVER)"),
]
TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(url: str, question: str) -> str:
    body = {"model": "kedit-live", "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": TOKENS}
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def _transformers_reply(gguf, question: str) -> str:
    """Greedy, through the GGUF's own chat template, read by transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _same_start(a: str, b: str) -> bool:
    """The first words agree (float32 in both engines, but summed in another order: a near
    tie late in a reply may go either way)."""
    return a.split()[:6] == b.split()[:6]


def test_llama_cpp_serves_each_published_version(embedded_lm, kedit_home, tmp_path):
    lm = embedded_lm
    db = open_db(kedit_home / "kedit.duckdb")
    base_id = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    case = read_zsre(DATA / "benchmarks" / "zsre_mend_train_1k.json", limit=1)[0]
    question = case.question or case.prompt
    editor = get_editor("alphaedit", {"solve": {"keystats_samples": 1500}, "update_gate": {"chats": 0}})
    result = editor.edit(lm, [case])
    try:
        path = delta_dir(lm.fingerprint) / "b-llama-1.safetensors"
        sha = result.delta.save(path)
        vid = ledger.add_version(db, base_id, lm.fingerprint, lm.spec, "alphaedit", "b-llama-1", str(path), sha,
                                 fingerprint_model(lm.model), note=json.dumps({"n_cases": 1}))
    finally:
        editor.rollback(lm, result)

    models = tmp_path / "models"
    publish_version(models, db, version_id=base_id, lm=lm, show_progress=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([LLAMA_SERVER, "--models-dir", str(models), "--host", "127.0.0.1", "--port", str(port),
                               "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "llama-server did not start"
            time.sleep(0.5)
        base_reply = _ask(url, question)
        assert _same_start(base_reply, _transformers_reply(models / "kedit-live" / "model.gguf", question))

        res = publish_version(models, db, version_id=vid, lm=lm, show_progress=False, llama_server=url)
        assert res.notified == {"llama_server": "ok"}
        edited_reply = _ask(url, question)
        assert edited_reply != base_reply  # the router now runs the edited file
        assert _same_start(edited_reply, _transformers_reply(models / "kedit-live" / "model.gguf", question))
    finally:
        server.terminate()
        server.wait(timeout=30)
