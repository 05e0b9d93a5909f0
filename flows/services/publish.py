"""`kedit publish DIR`: hand the live version to another serving engine.

Users who outgrow kedit's own server keep the nightly flow: each new live version is
exported (flows/services/export.py: the exact chain, GGUF or a Hugging Face folder) into a folder an
engine serves from, and the engine is told to load it. The layout is the one llama.cpp's
router (`llama-server --models-dir DIR`) reads, a folder per model:

    DIR/kedit-live -> versions/v7      the model the engine serves, a symlink flipped at once
    DIR/versions/v7/model.gguf         each published version, with its model card
    DIR/kedit-publish.json             what was published and whether the engine took it

Telling the engine (both optional, in this order):
- `llama_server=URL`: llama.cpp's router API, `POST /models/unload` then `POST
  /models/load` of the model's name; the new instance opens the file through the flipped
  link. The router lists the folder's models when it starts, so it is started (once) after
  the first publish. (A single-model `llama-server -m FILE` cannot reload: restart it with
  `command`.)
- `command`: any shell command (a process manager's restart, vLLM's or TGI's container
  restart), run with KEDIT_PUBLISHED_VERSION, KEDIT_PUBLISHED_DIR and KEDIT_PUBLISHED_FILE
  in its environment.

Publishing again is safe: a version already published whose engine took it is left alone;
one whose engine did not (it was down, the command failed) is only announced again. One
publisher at a time per DIR (a lock file beside the manifest).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from flows.services.export import export_version
from kedit_core.export import EXPORT_INFO
from kedit_core.atomic import atomic_write_text, tmp_path_for
from kedit_core.errors import KeditError
from kedit_core.model import LoadedModel
from storage import ledger
from storage.lock import ledger_lock

log = logging.getLogger("kedit.publish")

MANIFEST = "kedit-publish.json"
VERSIONS = "versions"
DEFAULT_NAME = "kedit-live"


class PublishError(KeditError):
    """Publishing failed before the engine was told anything (one line)."""


@dataclass
class PublishResult:
    version_id: int
    folder: Path  # DIR/versions/vN
    link: Path  # DIR/<name>
    exported: bool  # False: this version was already there
    notified: dict[str, str] = field(default_factory=dict)  # "llama_server"/"command" -> "ok" or the error
    removed: list[int] = field(default_factory=list)  # older versions pruned

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.notified.values())


def publish_version(
    out_dir: str | os.PathLike[str],
    db: Any,
    version_id: int | None = None,
    fmt: str = "gguf",
    name: str = DEFAULT_NAME,
    llama_server: str | None = None,
    command: str | None = None,
    keep: int = 2,
    spec: str | None = None,
    lm: LoadedModel | None = None,
    show_progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> PublishResult:
    """Publish `version_id` (default: the ledger's live version) of `db` (read only) to `out_dir`."""
    root = Path(out_dir).expanduser()
    if not root.parent.exists():
        raise PublishError(f"{root.parent} does not exist: create it first, or name a folder in an existing one")
    if keep < 1:
        raise PublishError(f"--keep must be at least 1 (the published version), got {keep}")
    if "/" in name or name in ("", ".", "..", VERSIONS):
        raise PublishError(f"--name {name!r} must be a plain folder name other than {VERSIONS!r}")
    version_id = version_id if version_id is not None else _live_version(db)
    if ledger.get_version(db, version_id) is None:
        raise PublishError(f"model version {version_id} is not in the ledger {db.path} (see `kedit versions`)")
    root.mkdir(exist_ok=True)
    with ledger_lock(root / "kedit-publish", kind="publish", wait_s=60.0):
        state = _read_manifest(root)
        folder = root / VERSIONS / f"v{version_id}"
        # a version folder is only ever written whole (export_version's atomic folder), so one
        # with its export record in this format is that version: not exported twice
        there = _exported_format(folder) == fmt
        same = there and state.get("version_id") == version_id and state.get("format") == fmt
        if not there:
            (root / VERSIONS).mkdir(exist_ok=True)
            export_version(version_id, folder, db, fmt=fmt, force=True, spec=spec, lm=lm,
                           show_progress=show_progress, device=device, dtype=dtype)
        link = root / name
        _point(link, Path(VERSIONS) / folder.name)
        result = PublishResult(version_id, folder, link, exported=not there)
        # an engine that took this version already is not told again; one that did not is told
        # again (it was down, or the command failed), and so is a new engine or command
        targets = {"llama_server": llama_server, "command": command}
        took = {k: v for k, v in state.get("notified", {}).items()
                if same and state.get("name") == name and state.get("targets", {}).get(k) == targets[k]}
        weights = _weights_file(folder, fmt)
        if llama_server:
            result.notified["llama_server"] = "ok" if took.get("llama_server") == "ok" else _reload_llama_server(llama_server, name)
        if command:
            result.notified["command"] = "ok" if took.get("command") == "ok" else _run_command(command, version_id, link, weights)
        result.removed = _prune(root, keep, version_id)
        _write_manifest(root, {
            "version_id": version_id, "format": fmt, "name": name, "folder": str(folder),
            "published": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "targets": targets, "notified": result.notified,
        })
    return result


def _live_version(db: Any) -> int:
    live = [r for r in ledger.list_versions(db) if r["status"] == "live"]
    if not live:
        raise PublishError(f"the ledger {db.path} has no live version yet: run the pipeline first (or name --version)")
    if len({r["base_fingerprint"] for r in live}) > 1:
        ids = ", ".join(f"v{r['version_id']} ({r['base_spec']})" for r in live)
        raise PublishError(f"the ledger holds live versions of several base models ({ids}): name one with --version")
    return int(live[0]["version_id"])


def _exported_format(folder: Path) -> str | None:
    try:
        return json.loads((folder / EXPORT_INFO).read_text())["export"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _weights_file(folder: Path, fmt: str) -> Path:
    return folder / "model.gguf" if fmt == "gguf" else folder


def _point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative), replaced in one rename: a reader opens
    the old version or the new one."""
    if link.exists() and not link.is_symlink():
        raise PublishError(f"{link} exists and is not kedit's link: move it away or choose another --name")
    tmp = tmp_path_for(link)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def _reload_llama_server(url: str, name: str, wait_s: float = 300.0) -> str:
    """Ask a llama.cpp router to drop its instance of `name` and start a new one from the
    file the link now points to, and wait until it runs. Returns "ok" or the error, in one
    line. The router unloads in the background (a load right after the unload is refused
    with "model is already running"), so each step waits for the status it asked for."""
    base = url.rstrip("/")
    try:
        # unloading a model that is not loaded is refused with 400: nothing to drop
        requests.post(f"{base}/models/unload", json={"model": name}, timeout=60)
        if not _wait_status(base, name, ("unloaded", None), wait_s):
            return f"llama-server at {base} did not unload {name!r} within {wait_s:.0f} s"
        reply = requests.post(f"{base}/models/load", json={"model": name}, timeout=60)
        if reply.status_code == 404:  # the router lists its --models-dir once, when it starts
            return (f"llama-server at {base} does not know {name!r}: it lists its models folder when it starts; "
                    "start it (once) after the first publish")
        if reply.status_code != 200:
            return f"llama-server at {base} refused to load {name!r}: HTTP {reply.status_code} {reply.text[:200]}"
        if not _wait_status(base, name, ("loaded",), wait_s):
            return f"llama-server at {base} did not load {name!r} within {wait_s:.0f} s (status {_status(base, name)})"
    except requests.RequestException as exc:
        return f"llama-server at {base} could not be reached: {type(exc).__name__}: {exc}"
    return "ok"


def _status(base: str, name: str) -> str | None:
    """The router's status of model `name` ("loaded", "loading", "unloaded", ...; None: not listed)."""
    models = requests.get(f"{base}/models", timeout=30).json().get("data", [])
    for m in models:
        if m.get("id") == name:
            status = m.get("status")
            return status.get("value") if isinstance(status, dict) else status
    return None


def _wait_status(base: str, name: str, wanted: tuple[str | None, ...], wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if _status(base, name) in wanted:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _run_command(command: str, version_id: int, link: Path, weights: Path) -> str:
    env = {**os.environ, "KEDIT_PUBLISHED_VERSION": str(version_id), "KEDIT_PUBLISHED_DIR": str(link),
           "KEDIT_PUBLISHED_FILE": str(link / weights.name) if weights.is_file() else str(link)}
    try:
        done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"the publish command timed out after 600 s: {command}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return f"the publish command exited {done.returncode}: {command} ({tail[0][:200]})"
    return "ok"


def _prune(root: Path, keep: int, current: int) -> list[int]:
    """Remove all but the newest `keep` published versions (never the current one)."""
    folders = sorted((int(p.name[1:]), p) for p in (root / VERSIONS).iterdir()
                     if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit())
    doomed = [(v, p) for v, p in folders if v != current][: max(0, len(folders) - keep)]
    for _, p in doomed:
        shutil.rmtree(p)
    return [v for v, _ in doomed]


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("ignoring an unreadable %s (it is rewritten by this publish)", path)
        return {}


def _write_manifest(root: Path, state: dict[str, Any]) -> None:
    atomic_write_text(root / MANIFEST, json.dumps(state, indent=1) + "\n")
