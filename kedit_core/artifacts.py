"""Where kedit's artifacts live, and how a file read back is known to be the one written.

An artifact is a file kedit writes and later reads back: a batch's weight delta, the
editor state saved with it, a run's frozen regression suite, a report. Their paths are
decided here (and nowhere else), every one is written through `kedit_core.atomic` (a
temporary name, then one rename), and the ones the ledger vouches for carry a sha256
(`file_sha256`) that is checked before they are used.

Deltas and editor states live beside the ledger that records them (one ledger, one delta
folder), in a folder per base model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kedit_core.atomic import atomic_target
from kedit_core.home import default_ledger_path, kedit_home

# --------------------------------------------------------------------------- checksums


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- paths


def delta_dir(base_fingerprint: str, create: bool = True) -> Path:
    """The folder of one base model's deltas and editor states, beside the ledger.
    Readers pass `create=False`: looking a file up must not make folders."""
    path = default_ledger_path(create=create).parent / "deltas" / base_fingerprint[:16]
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def delta_path(base_fingerprint: str, batch_id: str, create: bool = True) -> Path:
    """Where an accepted batch's weight delta is saved (safetensors)."""
    return delta_dir(base_fingerprint, create=create) / f"{batch_id}.safetensors"


def state_path(base_fingerprint: str, batch_id: str) -> Path:
    """Where an editor's sequential state after `batch_id` is kept (beside the delta).
    Only the path: the writer (`save_editor_state`) makes the folder."""
    return delta_dir(base_fingerprint, create=False) / f"{batch_id}.state.safetensors"


def suite_path(run_id: str) -> Path:
    """A run's frozen regression suite (JSON), read back when the run is restarted."""
    return kedit_home() / "suites" / f"{run_id}.json"


# --------------------------------------------------------------------------- editor state files
# (the pipeline writes them, the server and `kedit ask` read them)


def save_editor_state(state: dict[str, Any], path: Path, method: str) -> str:
    """Tensors go into safetensors under their path in the dict; everything else into a
    JSON skeleton in the metadata, with {"__tensor__": key} where a tensor was. Returns the
    file's sha256 (recorded in the version's note and checked when the state is restored)."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {str(k): strip(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v, f"{key}/{i}") for i, v in enumerate(obj)]
        return obj

    skeleton = strip(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={"method": method, "skeleton": json.dumps(skeleton)})
    return file_sha256(path)


def load_editor_state(path: Path) -> tuple[str, dict[str, Any]]:
    """(method, state) as `save_editor_state` wrote them."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    return meta.get("method", ""), fill(json.loads(meta.get("skeleton", "{}")))
