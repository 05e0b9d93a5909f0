"""The server under hostile or heavy load (issue 23, point 4), on a tiny model served for
real on 127.0.0.1: a body-size limit before parsing, the context check on characters
before tokenising, tokenising outside the shared tokenizer lock, a bounded admission
queue (429 + Retry-After), cancellation when a non-streaming client disconnects,
OpenAI ranges for sampling parameters, and a bearer token for inference."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
import torch

import kedit_core.serving as serving
import kedit_core.serving.app as serving_app
import kedit_core.serving.generation as serving_generation
from kedit_core.serving import (
    BackgroundServer,
    Generation,
    ServingState,
    check_inference_binding,
    create_app,
    encode_prompt,
)

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def state(tiny_llama):
    return ServingState(tiny_llama, max_tokens_limit=64)


def serve(state, **kw):
    return BackgroundServer(create_app(state, None, **kw))


class HeldGeneration:
    """Stands in for `generate_text` (generate_served still wraps it): holds each generation
    until released or cancelled, recording which were cancelled."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.cancelled: list[bool] = []

    def __call__(self, lm, input_ids, params, on_piece=None, cancel=None):
        self.started.release()
        deadline = time.monotonic() + 20
        while not self.release.is_set() and not (cancel is not None and cancel.is_set()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self.cancelled.append(bool(cancel is not None and cancel.is_set()))
        return Generation("ok", int(input_ids.shape[1]), 1, "stop")


def _error(resp, status):
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()["error"]


def test_body_over_the_limit_is_413_before_parsing(state):
    with serve(state, max_body_bytes=10_000) as srv:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]}
        assert _error(requests.post(srv.url + "/v1/chat/completions", json=big), 413)["code"] == "request_too_large"
        # no Content-Length (chunked): read only up to the limit
        chunks = (b"x" * 4096 for _ in range(10))
        resp = requests.post(srv.url + "/v1/chat/completions", data=chunks, headers={"content-type": "application/json"})
        assert _error(resp, 413)["code"] == "request_too_large"
        assert requests.post(srv.url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_default_limit_refuses_a_ten_megabyte_chat_at_once(state):
    with serve(state) as srv:
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 10_000_000}]})
        t0 = time.perf_counter()
        resp = requests.post(srv.url + "/v1/chat/completions", data=big, headers={"content-type": "application/json"})
        assert _error(resp, 413)["code"] == "request_too_large" and time.perf_counter() - t0 < 5


def test_context_is_checked_on_characters_before_tokenising(state, monkeypatch):
    def no_tokenising(*a, **k):
        raise AssertionError("tokenised a prompt that cannot fit")

    monkeypatch.setattr(serving_app, "encode_prompt", no_tokenising)
    with serve(state) as srv:
        long = {**CHAT, "messages": [{"role": "user", "content": "x" * 900_000}]}
        err = _error(requests.post(srv.url + "/v1/chat/completions", json=long), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        err = _error(requests.post(srv.url + "/v1/completions", json={"model": "tiny-llama", "prompt": "y" * 900_000}), 400)
        assert err["code"] == "context_length_exceeded"


def test_prompts_are_encoded_outside_the_shared_tokenizer_lock(tiny_llama):
    done = threading.Event()
    got = {}

    def encode():
        got["ids"] = encode_prompt(tiny_llama, "Where is the Eiffel tower?")
        done.set()

    with serving._TOKENIZER_LOCK:  # as a streaming request decoding a token holds it
        threading.Thread(target=encode, daemon=True).start()
        assert done.wait(5), "encoding waited for the lock every streaming request takes per token"
    want = tiny_llama.tokenizer("Where is the Eiffel tower?", add_special_tokens=False)["input_ids"]
    assert got["ids"].tolist() == [list(want)]


@pytest.mark.parametrize("field,value", [("temperature", 1e308), ("temperature", -0.5), ("temperature", 2.5),
                                         ("top_p", 5), ("top_p", 0), ("presence_penalty", 3),
                                         ("frequency_penalty", -2.5)])
def test_sampling_parameters_out_of_openai_range_are_400(state, field, value):
    with serve(state) as srv:
        err = _error(requests.post(srv.url + "/v1/chat/completions", json={**CHAT, field: value}), 400)
        assert err["param"] == field and err["code"] == "invalid_value"
        err = _error(requests.post(srv.url + "/v1/completions", json={"model": "tiny-llama", "prompt": "a", field: value}), 400)
        assert err["param"] == field


def test_stop_takes_at_most_four_and_valid_values_still_work(state):
    with serve(state) as srv:
        err = _error(requests.post(srv.url + "/v1/chat/completions", json={**CHAT, "stop": list("abcde")}), 400)
        assert err["param"] == "stop"
        ok = requests.post(srv.url + "/v1/chat/completions",
                           json={**CHAT, "temperature": 2, "top_p": 1, "stop": ["\n", "zz"], "seed": 1})
        assert ok.status_code == 200, ok.text


def test_admission_queue_is_bounded_429_with_retry_after(state, monkeypatch):
    held = HeldGeneration()
    monkeypatch.setattr(serving_generation, "generate_text", held)
    with serve(state, max_pending=2) as srv:
        results = []
        workers = [threading.Thread(target=lambda: results.append(
            requests.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code)) for _ in range(2)]
        for w in workers:
            w.start()
        assert held.started.acquire(timeout=10) and held.started.acquire(timeout=10)
        busy = requests.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert _error(busy, 429)["code"] == "server_busy" and busy.headers["Retry-After"] == "1"
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200  # not counted
        held.release.set()
        for w in workers:
            w.join(30)
        assert results == [200, 200]
        assert requests.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_non_streaming_client_disconnect_cancels_its_generation(state, monkeypatch):
    held = HeldGeneration()
    monkeypatch.setattr(serving_generation, "generate_text", held)
    with serve(state) as srv:
        body = json.dumps(CHAT).encode()
        sock = socket.create_connection((srv.host, srv.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert held.started.acquire(timeout=10)
        sock.close()  # the client goes away mid-generation
        deadline = time.monotonic() + 10
        while not held.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.cancelled == [True], "the generation ran on after its client left"
        for _ in range(100):  # its lease is released too
            if state.describe()["in_flight"] == 0:
                break
            time.sleep(0.05)
        assert state.describe()["in_flight"] == 0


def test_inference_requires_the_api_key_when_set(state):
    with serve(state, api_key="s3cret") as srv:
        assert _error(requests.get(srv.url + "/v1/models"), 401)["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer nope"}
        resp = requests.post(srv.url + "/v1/chat/completions", json=CHAT, headers=bad)
        assert _error(resp, 401)["code"] == "invalid_api_key" and resp.headers["WWW-Authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert requests.post(srv.url + "/v1/chat/completions", json=CHAT, headers=good).status_code == 200
        assert requests.get(srv.url + "/health").status_code == 200  # liveness stays open


def test_the_served_model_client_sends_the_api_key(state, monkeypatch):
    from connectors.served import ServedModelClient, ServedModelError

    with serve(state, api_key="s3cret") as srv:
        monkeypatch.delenv("KEDIT_API_KEY", raising=False)
        with pytest.raises(ServedModelError, match="401"):
            ServedModelClient(srv.url, model="tiny-llama").chat("hi", max_tokens=4)
        assert ServedModelClient(srv.url, model="tiny-llama", api_key="s3cret").chat("hi", max_tokens=4).finish_reason
        monkeypatch.setenv("KEDIT_API_KEY", "s3cret")  # `kedit ask --server` reads it from the environment
        assert ServedModelClient(srv.url).chat("hi", max_tokens=4).finish_reason


def test_public_bind_needs_an_api_key_unless_disabled(monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import _register_commands, app

    check_inference_binding("127.0.0.1", None)
    check_inference_binding("0.0.0.0", "k")
    check_inference_binding("0.0.0.0", None, require=False)
    with pytest.raises(Exception, match="KEDIT_API_KEY"):
        check_inference_binding("0.0.0.0", None)
    _register_commands()
    monkeypatch.delenv("KEDIT_API_KEY", raising=False)
    monkeypatch.setenv("KEDIT_ADMIN_TOKEN", "admin")
    refused = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert refused.exit_code != 0 and "KEDIT_API_KEY" in str(refused.exception)


def test_fast_tokenizer_prompts_encode_like_the_tokenizer_and_outside_its_lock():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "where": 2, "is": 3, "the": 4, "tower": 5, "?": 6}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", pad_token="[PAD]")
    tok(["where", "where is the tower"], padding=True)  # the shared tokenizer's padding state changed
    lm = SimpleNamespace(tokenizer=tok)
    text = "where is the Eiffel tower ?"
    encode_prompt(lm, text)  # the private encoder is made once
    got = {}
    with serving._TOKENIZER_LOCK:
        t = threading.Thread(target=lambda: got.setdefault("ids", encode_prompt(lm, text)), daemon=True)
        t.start()
        t.join(5)
    assert got["ids"].tolist() == [tok(text, add_special_tokens=False)["input_ids"]] == [[2, 3, 4, 0, 5, 6]]
