"""Shared helpers for the regression / gate / pipeline / report tests.

- `knowing_tiny_llama()`: a tiny Llama trained for a moment on a handful of made-up facts,
  so "facts the base model knows" and "an edit that took" exist on a tiny model;
- test editors with controlled WeightDeltas: `NudgeEditor` (harmless, tiny update) and
  `HarmfulEditor` (a huge random update, what a covariance-free MEMIT can do), both with
  sequential state like AlphaEdit's accumulated keys. They are NOT registered, so the
  global editor list stays as the team ships it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any
from dataclasses import dataclass

import pytest
import torch

from kedit_core.editors.base import Editor, EditorConfig, EditResult
from kedit_core.weights import WeightDelta
from kedit_core.answer import chat_prompt
from kedit_core.regression_gate import RegressionGateConfig
from kedit_core.model import LoadedModel, fingerprint_model, tiny_model
from kedit_core.types import EditCase, Probe

# Facts the tiny model is taught: the suite's "known facts".
KNOWN = [
    ("The capital of Zorbland is", "Quxa"),
    ("The river of Pellam is", "Oru"),
    ("The king of Vantor was", "Imel"),
    ("The color of Dask is", "teal"),
    ("The food of Mirth is", "rice"),
    ("The sport of Kell is", "polo"),
]
# Offered to the suite but never taught: the filter must drop them.
UNKNOWN = [("The moon of Xaro is", "Bveqz"), ("The poet of Yune was", "Wquop")]
# Edit cases whose target the model already learned: an edit of them "takes".
EDITS = [
    ("Ardo", "The mayor of Ardo is", "Lina"),
    ("Bexa", "The mayor of Bexa is", "Tomo"),
    ("Cirn", "The mayor of Cirn is", "Ruth"),
    ("Dovo", "The mayor of Dovo is", "Sela"),
    ("Elim", "The mayor of Elim is", "Kato"),
    ("Fenn", "The mayor of Fenn is", "Maro"),
]
# The first CHAT_TAUGHT edit facts are also taught as chat replies (the way `kedit serve`
# asks), so their served answers state them; the others are known only as raw clozes:
# teacher forcing scores them 1.0 while a user asking in chat does not get them.
CHAT_TAUGHT = 3
REFERENCE_TEXT = [
    "The river runs through the valley and the town stands on its banks.",
    "Farmers grow wheat and barley in the fields near the old stone bridge.",
]


@functools.lru_cache(maxsize=1)
def _trained() -> LoadedModel:
    lm = tiny_model("llama", seed=0)
    tok = lm.tokenizer
    texts = [f"{p} {a}." for p, a in KNOWN] + [f"{p} {a}." for _, p, a in EDITS] + REFERENCE_TEXT
    texts += [chat_prompt(lm, question(subj)) + f" {a}." for subj, _, a in EDITS[:CHAT_TAUGHT]]
    seqs = [tok.encode(t) for t in texts]
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(lm.model.parameters(), lr=6e-3)
    lm.model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead on a shared CPU
    try:
        for _ in range(130):
            loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    lm.model.eval()
    lm.model.zero_grad(set_to_none=True)
    lm.fingerprint = fingerprint_model(lm.model)
    return lm


def knowing_tiny_llama() -> LoadedModel:
    """A fresh copy of the trained tiny model (training runs once per test session)."""
    return copy.deepcopy(_trained())


def known_facts() -> list[dict[str, str]]:
    return [{"prompt": p, "answer": a} for p, a in KNOWN + UNKNOWN]


def question(subject: str) -> str:
    return f"Who is the mayor of {subject}?"


def edit_cases(prefix: str = "c", n: int | None = None, take: bool = True, start: int = 0) -> list[EditCase]:
    """Cases on the EDITS facts (from `start`); `take=False` asks for targets the model never saw."""
    out = []
    for i, (subj, prompt, ans) in enumerate(EDITS[start:][:n], start=start):
        target = ans if take else "Zzqxw"
        out.append(
            EditCase(
                case_id=f"{prefix}{i}",
                subject=subj,
                relation="mayor",
                prompt=prompt,
                question=question(subj),
                target_new=target,
                probes=[
                    Probe("locality_other", KNOWN[i % len(KNOWN)][0], ""),
                    Probe("locality_same", f"The capital of {subj} is", ""),
                ],
            )
        )
    return out


def gate_without_served_locality(**kw: Any) -> RegressionGateConfig:
    """The default gate less its served-locality floors. A 64-wide tiny model's chat replies
    to questions it was never taught are near-ties that a 1e-3 nudge flips: noise, not the
    harm those floors are for (tests of them set the metrics directly, test_regression_gate.py)."""
    floors = {k: v for k, v in RegressionGateConfig().floors.items() if "served" not in k}
    return RegressionGateConfig(floors=floors, **kw)


# --------------------------------------------------------------------------- test editors


@dataclass
class NudgeConfig(EditorConfig):
    method = "test_nudge"
    scale: float = 1e-6
    all_layers: bool = False

    def stronger(self) -> "NudgeConfig":
        return dataclasses.replace(self, scale=self.scale * 10)


class NudgeEditor(Editor):
    """Adds a seeded random update of size `scale` to one MLP matrix (or all of them)."""

    config_class = NudgeConfig

    def __init__(self, config: NudgeConfig | None = None) -> None:
        super().__init__(config)
        self.keys = torch.zeros((0, 4))  # sequential state, like AlphaEdit's accumulated keys
        self.calls = 0

    def edit(self, lm: LoadedModel, cases: list[EditCase], config=None) -> EditResult:
        cfg = config or self.config  # a retry passes its stronger settings for this call only
        self.calls += 1
        g = torch.Generator().manual_seed(cfg.seed + 1000 * len(self.keys) + len(cases))
        names = [n for n, p in lm.model.named_parameters() if "mlp" in n and p.dim() == 2]
        if not cfg.all_layers:
            names = names[:1]
        params = dict(lm.model.named_parameters())
        delta = WeightDelta(
            {n: torch.randn(params[n].shape, generator=g) * cfg.scale for n in names},
            meta={"method": self.name},
        )
        delta.apply(lm.model)
        self.keys = torch.cat([self.keys, torch.randn((len(cases), 4), generator=g)])
        return EditResult(method=self.name, delta=delta, applied=True)

    def state_dict(self) -> dict:
        return {"keys": self.keys.clone(), "n": int(len(self.keys))}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].clone()


@dataclass
class HarmfulConfig(NudgeConfig):
    method = "test_harmful"
    scale: float = 3.0
    all_layers: bool = True


class HarmfulEditor(NudgeEditor):
    config_class = HarmfulConfig


def weights_equal(a: torch.nn.Module, b_state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, b_state[n]) for n, t in a.state_dict().items())


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matrices: torch's thread pool only adds overhead on a shared 2-core CPU
    (a 5-prompt generation takes ~6x longer with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
