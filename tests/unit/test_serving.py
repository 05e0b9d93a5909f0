"""The serving app on a tiny model, started for real on 127.0.0.1 and talked to with the
official `openai` client and plain `requests`; versions come from a real DuckDB ledger
and real delta files, and are swapped while clients keep asking."""
from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass

import pytest
import requests
import torch

from connectors.served import ServedModelClient, ServedModelError
from flows.services.audit import audit_ledger, audit_server
from flows.services.serving import build_serving_state
from kedit_core.weights import WeightDelta
from kedit_core.model import fingerprint_model
from kedit_core.serving import BackgroundServer, ServingState, check_admin_binding, create_app, version_tag
from storage import ledger

openai = pytest.importorskip("openai")

TOKEN = "test-admin-token"
QUESTION = "Where is the Eiffel tower?"
MAX_TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """A hidden-64 model gains nothing from intra-op threads, and on a shared CPU their
    spinning made each tiny generate ~20x slower; restored for the rest of the suite."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def raw_answer(lm, question: str, max_tokens: int = MAX_TOKENS) -> str:
    """What a version should answer, computed without the serving code: the chat template
    by hand and a plain greedy `generate`."""
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=2)
    return lm.tokenizer.decode(out[0, ids.shape[1]:])


@dataclass
class Versions:
    base: int
    ids: list[int]  # v1 -> v2 -> v3, each the child of the one before
    expected: dict[int, str]  # version id -> its answer to QUESTION
    tags: dict[int, str]  # version id -> system_fingerprint
    paths: dict[int, str]


def make_versions(lm, db, folder, n: int = 3) -> Versions:
    """A chain of n versions whose deltas (random, on different layers) make each version
    answer QUESTION differently, recorded in the ledger with sha256 and weights fingerprint."""
    base = ledger.ensure_base_version(db, lm.fingerprint, lm.spec)
    work = copy.deepcopy(lm)
    expected = {base: raw_answer(work, QUESTION)}
    tags = {base: version_tag(base, lm.fingerprint)}
    ids, paths, parent = [], {}, base
    gen = torch.Generator().manual_seed(1)
    for k in range(n):
        name = f"model.layers.{k % 4}.mlp.down_proj.weight"
        shape = dict(work.model.named_parameters())[name].shape
        delta = WeightDelta({name: torch.randn(shape, generator=gen) * 0.5}, meta={"k": k})
        path = folder / f"delta_{k}.safetensors"
        sha = delta.save(path)
        delta.apply(work.model)
        fp = fingerprint_model(work.model)
        vid = ledger.add_version(db, parent, lm.fingerprint, lm.spec, "test", None, str(path), sha,
                                 weights_fingerprint=fp)
        expected[vid], tags[vid], paths[vid] = raw_answer(work, QUESTION), version_tag(vid, fp), str(path)
        ids.append(vid)
        parent = vid
    assert len(set(expected.values())) == n + 1, "the test deltas must make every version answer differently"
    return Versions(base, ids, expected, tags, paths)


@pytest.fixture
def versions(tiny_llama, db, tmp_path) -> Versions:
    return make_versions(tiny_llama, db, tmp_path / "deltas")


@pytest.fixture
def server(tiny_llama, db, versions):
    state = build_serving_state(tiny_llama, db, version=versions.base, max_tokens_limit=64)
    with BackgroundServer(create_app(state, TOKEN)) as srv:
        srv.state = state
        yield srv


def oai(srv) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def admin(srv) -> ServedModelClient:
    return ServedModelClient(srv.url, admin_token=TOKEN)


# --------------------------------------------------------------------------- OpenAI shape


def test_openai_client_chat_completion_and_stream(server, versions):
    client = oai(server)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]

    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=MAX_TOKENS)
    assert chat.choices[0].message.content == versions.expected[versions.base]
    assert chat.system_fingerprint == versions.tags[versions.base]
    assert chat.usage.completion_tokens == MAX_TOKENS and chat.choices[0].finish_reason == "length"

    prompt = "user: " + QUESTION + "\nassistant:"
    comp = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS)
    assert comp.choices[0].text == versions.expected[versions.base]  # same prompt, same weights
    assert comp.system_fingerprint == versions.tags[versions.base]

    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == versions.expected[versions.base]
    assert {c.system_fingerprint for c in chunks} == {versions.tags[versions.base]}
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_is_server_sent_events_ending_with_done(server, versions):
    resp = requests.post(server.url + "/v1/completions", stream=True, timeout=60,
                         json={"model": "tiny-llama", "prompt": "abc", "max_tokens": 4, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in resp.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequence_cuts_the_answer(server, versions):
    full = versions.expected[versions.base]
    stop = full[3:5]
    got = oai(server).chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=MAX_TOKENS, stop=[stop])
    assert got.choices[0].message.content == full[: full.find(stop)]
    assert got.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- errors


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


def test_bad_requests_get_openai_errors(server):
    url = server.url
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    err = _error(requests.post(url + "/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    err = _error(requests.post(url + "/v1/chat/completions", json={**chat, "max_tokens": 250}), 400)
    assert err["code"] == "invalid_value" and "at most 64" in err["message"]
    long_prompt = {**chat, "messages": [{"role": "user", "content": "x" * 240}], "max_tokens": 40}
    assert _error(requests.post(url + "/v1/chat/completions", json=long_prompt), 400)["code"] == "context_length_exceeded"
    err = _error(requests.post(url + "/v1/chat/completions", data=b'{"model": "tiny-llama", "messages": [',
                               headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    assert _error(requests.post(url + "/v1/chat/completions", json={**chat, "messages": []}), 400)["param"] == "messages"
    assert _error(requests.post(url + "/v1/chat/completions", json={"model": "tiny-llama"}), 400)["param"] == "messages"
    assert _error(requests.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "a", "n": 3}), 400)["param"] == "n"
    assert _error(requests.get(url + "/v1/nothing"), 404)["code"] == "not_found"
    assert _error(requests.get(url + "/admin/versions"), 401)["code"] == "missing_api_key"
    bad = {"Authorization": "Bearer wrong"}
    assert _error(requests.post(url + "/admin/rollback", headers=bad), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        oai(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    # none of this disturbed the server
    assert requests.get(url + "/health").json()["status"] == "ok"


def test_admin_disabled_without_token_and_refused_on_public_address(tiny_llama):
    check_admin_binding("127.0.0.1", None)  # loopback: allowed (admin answers 403 without a token)
    check_admin_binding("0.0.0.0", "secret")
    check_admin_binding("0.0.0.0", None, admin_enabled=False)
    with pytest.raises(Exception, match="KEDIT_ADMIN_TOKEN"):
        check_admin_binding("0.0.0.0", None)
    with BackgroundServer(create_app(ServingState(tiny_llama), None)) as srv:
        err = _error(requests.get(srv.url + "/admin/versions", headers={"Authorization": "Bearer x"}), 403)
        assert err["code"] == "admin_disabled"


# --------------------------------------------------------------------------- admin + client


def test_client_load_rollback_fingerprint(server, versions, db):
    client = admin(server)
    assert client.health()["version_id"] == versions.base
    listed = client.versions()
    assert [v["version_id"] for v in listed["versions"]] == [versions.base, *versions.ids]
    v1, v2, v3 = versions.ids

    assert client.publish(v2)["version_id"] == v2
    got = client.chat(QUESTION, max_tokens=MAX_TOKENS)
    assert (got.text, got.version_id, got.system_fingerprint) == (versions.expected[v2], v2, versions.tags[v2])
    assert client.ask(QUESTION, max_tokens=MAX_TOKENS) == versions.expected[v2].strip()
    assert client.fingerprint()["weights_fingerprint"] == ledger.get_version(db, v2)["weights_fingerprint"]

    client.load_version(v3)
    client.load_version(v1)
    assert client.versions()["history"] == [versions.base, v2, v3]
    assert client.rollback()["version_id"] == v3
    assert client.chat(QUESTION, max_tokens=MAX_TOKENS).text == versions.expected[v3]
    assert client.rollback()["version_id"] == v2
    assert client.rollback()["version_id"] == versions.base
    assert client.chat(QUESTION, max_tokens=MAX_TOKENS).text == versions.expected[versions.base]
    assert client.health()["copies_in_memory"] == 2
    for slot in server.state._slots:  # noqa: SLF001  memory stays bounded: one base copy of touched tensors
        assert set(slot.chain.base) <= {f"model.layers.{k}.mlp.down_proj.weight" for k in range(3)}

    with pytest.raises(ServedModelError) as exc:
        client.load_version(999)
    assert exc.value.status == 404
    with pytest.raises(ServedModelError) as exc:
        client.rollback()  # the base has nothing before it
    assert exc.value.status == 409


def test_tampered_delta_is_refused_and_old_version_keeps_serving(server, versions):
    client = admin(server)
    v1 = versions.ids[0]
    path = versions.paths[v1]
    delta = WeightDelta.load(path)
    name = next(iter(delta.tensors))
    delta.tensors[name][0, 0] += 1.0  # a one-number change, saved as a valid file
    delta.save(path)
    with pytest.raises(ServedModelError) as exc:
        client.load_version(v1)
    assert exc.value.status == 409 and "sha256" in str(exc.value)
    got = client.chat(QUESTION, max_tokens=MAX_TOKENS)
    assert (got.text, got.version_id) == (versions.expected[versions.base], versions.base)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ServedModelError, match="cannot reach"):
        ServedModelClient("http://127.0.0.1:9", timeout_s=2).health()


# --------------------------------------------------------------------------- memory editors


class PrefixRewriter:
    def rewrite_prompt(self, question: str) -> str:
        return "Fact: the tower is in Rome. " + question


def test_memory_editor_rewrites_inside_the_same_endpoint(tiny_llama, db, versions):
    mem = ledger.add_version(db, versions.ids[0], tiny_llama.fingerprint, tiny_llama.spec, "memory-test", None,
                             None, None, weights_fingerprint=None)
    work = copy.deepcopy(tiny_llama)
    WeightDelta.load(versions.paths[versions.ids[0]]).apply(work.model)
    expected = raw_answer(work, PrefixRewriter().rewrite_prompt(QUESTION))
    assert expected != versions.expected[versions.ids[0]]

    state = build_serving_state(tiny_llama, db, version=mem,
                                rewriter_for=lambda row: PrefixRewriter() if row["method"] == "memory-test" else None)
    with BackgroundServer(create_app(state, TOKEN)) as srv:
        got = ServedModelClient(srv.url).chat(QUESTION, max_tokens=MAX_TOKENS)
        assert (got.text, got.version_id) == (expected, mem)
        assert admin(srv).versions()["memory_rewriter"] == "PrefixRewriter"
        admin(srv).load_version(versions.ids[0])  # back to a plain weight version: no rewriting
        assert ServedModelClient(srv.url).chat(QUESTION, max_tokens=MAX_TOKENS).text == versions.expected[versions.ids[0]]


# --------------------------------------------------------------------------- atomic swaps


def test_swap_waits_for_requests_on_the_old_copy(tiny_llama, db, versions):
    """A request holding the old weights keeps them bit for bit while versions change."""
    state = build_serving_state(tiny_llama, db, version=versions.base)
    v1, v2, _ = versions.ids
    held = state.acquire()  # an in-flight request on the base
    state.load_version(v1)  # builds on the second copy: does not wait
    assert fingerprint_model(held.lm.model) == held.weights_fingerprint
    done = threading.Event()
    swapper = threading.Thread(target=lambda: (state.load_version(v2), done.set()))
    swapper.start()
    time.sleep(0.3)
    assert not done.is_set(), "v2 must wait: its copy is still answering the base request"
    with state.lease() as meanwhile:  # new requests are served by v1 in the meantime
        assert meanwhile.version_id == v1
    assert fingerprint_model(held.lm.model) == held.weights_fingerprint
    state.release(held)
    swapper.join(timeout=30)
    assert done.is_set() and state.version_id == v2


def test_load_test_during_swaps_every_answer_from_exactly_one_version(server, versions):
    threads_n, per_thread = 4, 25
    results: list[tuple[str, str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    finished = threading.Event()

    def client_thread(i: int) -> None:
        client = oai(server)
        for j in range(per_thread):
            t0 = time.perf_counter()
            try:
                if j % 5 == 4:  # some streamed answers too
                    chunks = list(client.chat.completions.create(
                        model="tiny-llama", messages=[{"role": "user", "content": QUESTION}],
                        max_tokens=MAX_TOKENS, stream=True))
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    tags = {c.system_fingerprint for c in chunks}
                    assert len(tags) == 1, f"one stream from several versions: {tags}"
                    tag = tags.pop()
                else:
                    r = client.chat.completions.create(model="tiny-llama", max_tokens=MAX_TOKENS,
                                                       messages=[{"role": "user", "content": QUESTION}])
                    text, tag = r.choices[0].message.content, r.system_fingerprint
                with lock:
                    results.append((tag, text, time.perf_counter() - t0))
            except Exception as exc:  # counted, reported below
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    swaps = []

    def swapper() -> None:
        client = admin(server)
        cycle = [*versions.ids, "rollback", "rollback", versions.base]
        k = 0
        while not finished.is_set():
            step = cycle[k % len(cycle)]
            try:
                client.rollback() if step == "rollback" else client.load_version(step)
                swaps.append(step)
            except Exception as exc:
                errors.append(f"swap {step}: {exc}")
            k += 1
            time.sleep(0.01)

    workers = [threading.Thread(target=client_thread, args=(i,)) for i in range(threads_n)]
    sw = threading.Thread(target=swapper)
    t0 = time.perf_counter()
    sw.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    finished.set()
    sw.join(timeout=30)
    wall = time.perf_counter() - t0

    by_tag = {tag: vid for vid, tag in versions.tags.items()}
    wrong = [(tag, text) for tag, text, _ in results if tag not in by_tag or text != versions.expected[by_tag[tag]]]
    lat = sorted(r[2] for r in results)
    seen = {by_tag.get(tag) for tag, _, _ in results}
    print(f"\nload test: {len(results)} requests served in {wall:.2f}s by {threads_n} clients, errors {len(errors)}, "
          f"swaps {len(swaps)}, versions seen {sorted(v for v in seen if v is not None)}, "
          f"latency p50 {lat[len(lat) // 2] * 1000:.1f} ms p95 {lat[int(len(lat) * 0.95)] * 1000:.1f} ms")
    assert errors == []
    assert len(results) == threads_n * per_thread
    assert wrong == [], "answers that match no single version"
    assert len(swaps) >= 5 and len(seen) >= 2


# --------------------------------------------------------------------------- audit


def test_audit_local_and_served(server, versions, db):
    from kedit_core.model import tiny_model

    fresh = tiny_model("llama", seed=0)  # an unedited base (the server's copy carries deltas)
    findings = audit_ledger(fresh, db)
    assert [f.status for f in findings] == ["ok"] * 4
    assert fingerprint_model(fresh.model) == fresh.fingerprint  # left at the base weights

    client = admin(server)
    client.load_version(versions.ids[1])
    assert [f.status for f in audit_server(client, db)] == ["ok"]

    # An edit outside the pipeline: someone changes the served weights in place.
    with server.state.lease() as held, torch.no_grad():
        dict(held.lm.model.named_parameters())["model.layers.0.mlp.up_proj.weight"][0, 0] += 0.01
    problems = audit_server(client, db)
    assert [f.status for f in problems] == ["mismatch"] and "outside the pipeline" in problems[0].detail

    # A delta file replaced on disk is caught by the local audit.
    p = versions.paths[versions.ids[2]]
    d = WeightDelta.load(p)
    next(iter(d.tensors.values()))[0, 0] += 1
    d.save(p)
    statuses = {f.version_id: f.status for f in audit_ledger(fresh, db)}
    assert statuses[versions.ids[2]] == "tampered" and statuses[versions.ids[1]] == "ok"


# --------------------------------------------------------------------------- command line


def _cli():
    import typer

    from flows.commands import model_cmds, serve_cmd

    app = typer.Typer()
    serve_cmd.register(app)
    model_cmds.register(app)
    return app


def test_cli_ask_server_status_and_public_bind_refusal(server, versions, monkeypatch):
    from typer.testing import CliRunner

    runner = CliRunner()
    app = _cli()
    got = runner.invoke(app, ["ask", QUESTION, "--server", server.url, "--max-new-tokens", str(MAX_TOKENS)])
    assert got.exit_code == 0, got.output
    assert got.output.strip() == versions.expected[versions.base].strip()

    monkeypatch.setenv("KEDIT_ADMIN_TOKEN", TOKEN)
    status = runner.invoke(app, ["server", "load", str(versions.ids[0]), "--server", server.url])
    assert status.exit_code == 0 and json.loads(status.output)["version_id"] == versions.ids[0]

    monkeypatch.delenv("KEDIT_ADMIN_TOKEN")
    refused = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert refused.exit_code != 0 and "KEDIT_ADMIN_TOKEN" in str(refused.exception)


def test_memory_editor_version_is_restored_from_its_saved_state(tiny_llama, db, versions):
    """A memory editor's version is served with the memory the pipeline saved for its batch."""
    from dataclasses import dataclass as dc
    from typing import ClassVar

    from kedit_core.artifacts import save_editor_state, state_path
    from kedit_core.editors.base import EDITORS, Editor, EditorConfig, register

    @dc
    class NoteConfig(EditorConfig):
        method: ClassVar[str] = "serving-test-memory"
        template: str = "{note} {question}"

    class NoteEditor(Editor):
        config_class = NoteConfig
        is_memory_editor = True

        def __init__(self, config=None):
            super().__init__(config)
            self.note = ""

        def edit(self, lm, cases, config=None):
            raise NotImplementedError("this test editor only restores state")

        def rewrite_prompt(self, question):
            return self.config.template.format(note=self.note, question=question)

        def state_dict(self):
            return {"note": self.note}

        def load_state_dict(self, state):
            self.note = state["note"]

    register("serving-test-memory")(NoteEditor)
    try:
        save_editor_state({"note": "Paris is in Italy."}, state_path(tiny_llama.fingerprint, "b-mem"),
                          "serving-test-memory")
        note = json.dumps({"config": {"method": "serving-test-memory", "template": "Fact: {note}\n{question}"}})
        mem = ledger.add_version(db, versions.base, tiny_llama.fingerprint, tiny_llama.spec, "serving-test-memory",
                                 "b-mem", None, None, weights_fingerprint=tiny_llama.fingerprint, note=note)
        lost = ledger.add_version(db, versions.base, tiny_llama.fingerprint, tiny_llama.spec,
                                  "serving-test-memory", "b-gone", None, None)
        wrong_sha = json.dumps({"state_sha256": "0" * 64})  # the saved memory is not the one recorded
        tampered = ledger.add_version(db, versions.base, tiny_llama.fingerprint, tiny_llama.spec,
                                      "serving-test-memory", "b-mem", None, None, note=wrong_sha)
        state = build_serving_state(tiny_llama, db, version=mem)
        expected = raw_answer(tiny_llama, "Fact: Paris is in Italy.\n" + QUESTION)
        assert expected != versions.expected[versions.base]  # the memory changes the answer
        with state.lease() as held:
            assert held.rewriter.note == "Paris is in Italy."
        with BackgroundServer(create_app(state, TOKEN)) as srv:
            assert ServedModelClient(srv.url).chat(QUESTION, max_tokens=MAX_TOKENS).text == expected
            with pytest.raises(ServedModelError, match="saved memory .* is missing") as exc:
                admin(srv).load_version(lost)
            assert exc.value.status == 409
            with pytest.raises(ServedModelError, match="has sha256 .* recorded 0000") as exc:
                admin(srv).load_version(tampered)
            assert exc.value.status == 409
    finally:
        EDITORS.pop("serving-test-memory", None)
