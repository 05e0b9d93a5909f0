"""On the real embedded model: a deliberately harmful update (a huge covariance-free
rank-one write into several MLP output projections, what MEMIT without its key statistics
can do) is caught by the gate's fast check, rolled back bit for bit, its cases rejected
with the reason, and the drift report shows the rolled-back batch."""
from __future__ import annotations

import pytest
import torch

from storage.report_queries import collect_report
from flows.services.gated_batches import apply_gated_batches
from flows.services.runtime import open_live_model
from kedit_core.editors.base import Editor, EditResult
from kedit_core.weights import WeightDelta
from kedit_core.regression_gate import RegressionGateConfig
from kedit_core.regression import FLUENCY_PROMPTS, freeze_suite, load_known_facts, load_reference_text
from kedit_core.report import terminal_summary
from kedit_core.types import EditCase
from storage import ledger

pytestmark = pytest.mark.integration


class CovarianceFreeBlowUp(Editor):
    """W += u v^T with a large norm in layers 3-7's down projections."""

    def edit(self, lm, cases, config=None):
        g = torch.Generator().manual_seed(0)
        params = dict(lm.model.named_parameters())
        tensors = {}
        for layer in range(3, 8):
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            out_dim, in_dim = params[name].shape
            u, v = torch.randn(out_dim, 1, generator=g), torch.randn(1, in_dim, generator=g)
            tensors[name] = (u @ v) * 0.5
        delta = WeightDelta(tensors)
        delta.apply(lm.model)
        return EditResult(method=self.name, delta=delta, applied=True)


def test_harmful_update_on_the_embedded_model_is_caught_and_rolled_back(embedded_lm, db):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core CPU one thread is several times faster
    params = dict(embedded_lm.model.named_parameters())
    touched = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3, 8)}
    saved = {n: params[n].detach().clone() for n in touched}
    try:
        live = open_live_model(db=db, lm=embedded_lm)
        suite = freeze_suite(
            embedded_lm,
            known_facts=load_known_facts()[:16],
            reference_text=load_reference_text()[:2],
            fluency_prompts=FLUENCY_PROMPTS[:2],
            fluency_tokens=16,
        )
        assert suite.base_metrics["known_facts_acc"] == 1.0 and len(suite.known_facts) >= 8
        cases = [
            EditCase("emb1", "Zorbland", "P36", "The capital of Zorbland is", "Quxa"),
            EditCase("emb2", "Pellam", "P38", "The currency of Pellam is the", "florin"),
        ]
        report = apply_gated_batches(
            live, CovarianceFreeBlowUp(), cases, db, RegressionGateConfig(full_check_every=100), 2, "emb-harm", suite
        )
        (batch,) = report.batches
        assert batch.status == "rejected" and report.n_rejected == 2
        assert any("known_facts_acc" in r or "ref_ppl" in r for r in batch.reasons)
        for n in touched:
            assert torch.equal(params[n], saved[n])  # exact restore
        assert live.version_id == live.base_version_id
        assert {r["status"] for r in ledger.case_rows(db)} == {"rejected"}
        text = terminal_summary(collect_report(db))
        assert batch.batch_id in text and "rolled_back 1" in text
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)  # whatever happened, the shared session model is left as it was
        torch.set_num_threads(threads)
