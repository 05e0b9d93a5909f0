"""`kedit publish DIR` (flows/services/publish.py): the live version into another engine's model
folder, the engine told by a real shell command or a llama.cpp router's HTTP API (here a
real HTTP server on 127.0.0.1 that reads the linked file when asked to load, as the router
does; tests/integration/test_llama_server.py runs llama.cpp itself where it is installed)."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gatekit import single_thread  # noqa: F401  (autouse fixture)
from storage.db import open_db
from tests.unit.test_cli_errors import kedit, one_error_line
from tests.unit.test_export import _alphaedit_ledger


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_publish_exports_links_and_runs_the_command_once_per_version(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    before = _sha(ledger_path)
    out, marker = tmp_path / "models", tmp_path / "announced.txt"
    command = f'echo "$KEDIT_PUBLISHED_VERSION $KEDIT_PUBLISHED_FILE" >> {marker}'

    code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--command", command)
    assert code == 0, err
    link = out / "kedit-live"
    assert link.is_symlink() and link.resolve() == (out / "versions" / f"v{vid}").resolve()
    assert f"exported version {vid}" in stdout and "command: ok" in stdout
    assert marker.read_text().split() == [str(vid), str(link / "model.gguf")]
    weights = link / "model.gguf"
    assert weights.is_file() and (link / "README.md").exists()
    manifest = json.loads((out / "kedit-publish.json").read_text())
    assert manifest["version_id"] == vid and manifest["notified"] == {"command": "ok"}
    assert _sha(ledger_path) == before  # the ledger is only read

    # again: nothing exported, the command not run twice
    mtime = weights.stat().st_mtime_ns
    code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--command", command)
    assert code == 0, err
    assert "already there: version" in stdout
    assert weights.stat().st_mtime_ns == mtime and len(marker.read_text().splitlines()) == 1


def test_a_failed_announcement_exits_non_zero_and_is_retried_without_exporting_again(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    out, flag = tmp_path / "models", tmp_path / "engine-up"
    command = f"test -e {flag} || {{ echo 'engine down' >&2; exit 3; }}"
    code, stdout, _ = kedit(capsys, "publish", out, "--db", ledger_path, "--command", command, "--format", "hf")
    assert code == 1
    assert "command: the publish command exited 3" in stdout and "(engine down)" in stdout
    assert (out / "kedit-live" / "model.safetensors").is_file()  # the folder is published; the engine did not take it
    mtime = (out / "kedit-live" / "model.safetensors").stat().st_mtime_ns
    flag.touch()
    code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--command", command, "--format", "hf")
    assert code == 0, err
    assert "already there" in stdout and "command: ok" in stdout
    assert (out / "kedit-live" / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_new_version_flips_the_link_and_older_ones_are_pruned(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    base_id = vid - 1
    out = tmp_path / "models"
    code, _, err = kedit(capsys, "publish", out, "--db", ledger_path, "--version", str(base_id), "--format", "hf")
    assert code == 0, err
    base_sha = _sha(out / "kedit-live" / "model.safetensors")
    code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--format", "hf", "--keep", "1")
    assert code == 0, err
    assert (out / "kedit-live").resolve().name == f"v{vid}"
    assert _sha(out / "kedit-live" / "model.safetensors") != base_sha  # the edited weights
    assert f"removed older versions: v{base_id}" in stdout
    assert sorted(p.name for p in (out / "versions").iterdir()) == [f"v{vid}"]


class _Router(BaseHTTPRequestHandler):
    """llama.cpp's router endpoints, as far as kedit uses them: on load it opens the model
    file behind the link, as the router's new instance does; an unload takes a moment, and
    a load before it is done is refused, as the router does."""

    calls: list = []
    state: dict = {}
    models_dir: Path

    def _reply(self, code: int, body: dict) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def do_GET(self):  # noqa: N802 (http.server's name)
        state = self.state.get("kedit-live", "unloaded")
        if state == "unloading":  # seen once, then done
            self.state["kedit-live"] = "unloaded"
        self._reply(200, {"data": [{"id": "kedit-live", "status": {"value": state}}]})

    def do_POST(self):  # noqa: N802
        name = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["model"]
        if self.path == "/models/unload":
            self.calls.append(("unload", name, None))
            if self.state.get(name) != "loaded":
                return self._reply(400, {"error": {"message": "model is not running"}})
            self.state[name] = "unloading"
            return self._reply(200, {"success": True})
        if self.state.get(name) in ("loaded", "unloading"):
            return self._reply(400, {"error": {"message": "model is already running"}})
        weights = self.models_dir / name / "model.gguf"
        self.calls.append(("load", name, hashlib.sha256(weights.read_bytes()).hexdigest()))
        self.state[name] = "loaded"
        self._reply(200, {"success": True})

    def log_message(self, *args):
        pass


def test_a_llama_cpp_router_is_asked_to_reload_the_linked_file(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    vid, _, _, _ = _alphaedit_ledger(ledger_path)
    out = tmp_path / "models"
    handler = type("Router", (_Router,), {"calls": [], "state": {"kedit-live": "loaded"}, "models_dir": out})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--llama-server", url)
        assert code == 0, err
        assert "llama_server: ok" in stdout
        assert [c[:2] for c in handler.calls] == [("unload", "kedit-live"), ("load", "kedit-live")]
        assert handler.calls[1][2] == _sha(out / "versions" / f"v{vid}" / "model.gguf")  # the new version's file
    finally:
        server.shutdown()
    # the same version again: the router took it, it is not asked again
    code, stdout, err = kedit(capsys, "publish", out, "--db", ledger_path, "--llama-server", url)
    assert code == 0 and "already there" in stdout and len(handler.calls) == 2, err
    # the router gone: another version is published, the failure said in one line, exit 1
    code, stdout, _ = kedit(capsys, "publish", out, "--db", ledger_path, "--llama-server", url, "--version", str(vid - 1))
    assert code == 1 and "llama_server: llama-server at" in stdout and "could not be reached" in stdout
    assert json.loads((out / "kedit-publish.json").read_text())["notified"]["llama_server"] != "ok"  # tried again next time


def test_nothing_to_publish_is_one_line(kedit_home, tmp_path, capsys):
    ledger_path = kedit_home / "kedit.duckdb"
    open_db(ledger_path)  # a ledger with no version yet
    code, _, err = kedit(capsys, "publish", tmp_path / "models", "--db", ledger_path)
    assert code == 2 and "has no live version yet" in one_error_line(err)
