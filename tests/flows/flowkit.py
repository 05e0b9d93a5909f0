"""Test editors for whole-flow tests on tiny models. Importing this module registers them
(tests and the subprocess of the kill test import it; the shipped registry never does).

- `nudge`: a tiny deterministic update of one MLP matrix: harmless, fast, always "takes"
  when the gate's take floor is 0, so flows produce real versions, deltas and rollbacks
  without the cost of MEMIT on every test.
- `harmful`: a huge random update (what a covariance-free MEMIT step can do): the gate must
  roll it back.
- `nudge` sleeps inside `edit` when KEDIT_TEST_PAUSE_FILE is set, after writing that file,
  so a test can kill the process mid-batch; with KEDIT_TEST_RESUME_FILE also set it goes on
  once that file exists (a run held mid-batch while a test starts another).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit_core.editors.base import Editor, EditorConfig, EditResult, register
from kedit_core.weights import WeightDelta
from kedit_core.model import LoadedModel
from kedit_core.types import EditCase


def _mlp_out(lm: LoadedModel) -> str:
    names = [n for n, _ in lm.model.named_parameters() if n.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight"))]
    return names[len(names) // 2]


@dataclass
class NudgeConfig(EditorConfig):
    scale: float = 1e-4
    pause_s: float = 0.0


@register("nudge")
class NudgeEditor(Editor):
    config_class = NudgeConfig

    def edit(self, lm: LoadedModel, cases: list[EditCase], config=None) -> EditResult:
        cfg = config or self.config  # a retry passes its stronger settings for this call only
        name = _mlp_out(lm)
        param = dict(lm.model.named_parameters())[name]
        g = torch.Generator().manual_seed(sum(len(c.case_id) for c in cases))
        delta = WeightDelta({name: torch.randn(param.shape, generator=g) * cfg.scale})
        pause = os.environ.get("KEDIT_TEST_PAUSE_FILE")
        if pause and not Path(pause).exists():
            Path(pause).write_text(str(os.getpid()))
            _hold_until(os.environ.get("KEDIT_TEST_RESUME_FILE"))  # the test kills us here, or resumes us
        delta.apply(lm.model)
        return EditResult(method="nudge", delta=delta, applied=True)


def _hold_until(resume: str | None, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not (resume and Path(resume).exists()):
        time.sleep(0.1)


@dataclass
class HarmfulConfig(EditorConfig):
    scale: float = 5.0


@register("harmful")
class HarmfulEditor(Editor):
    config_class = HarmfulConfig

    def edit(self, lm: LoadedModel, cases: list[EditCase], config=None) -> EditResult:
        cfg = config or self.config  # a retry passes its stronger settings for this call only
        g = torch.Generator().manual_seed(0)
        tensors = {
            n: torch.randn(p.shape, generator=g) * cfg.scale
            for n, p in lm.model.named_parameters()
            if n.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight"))
        }
        delta = WeightDelta(tensors)
        delta.apply(lm.model)
        return EditResult(method="harmful", delta=delta, applied=True)
