"""run_stream on a tiny model: batches in order, metrics after the last, exact restore."""
from __future__ import annotations

import torch

from kedit_core.editors import get_editor
from kedit_core.stream import run_stream
from kedit_core.types import EditCase, Probe

FAST = {"layers": [1, 2], "solve": {"keystats_samples": 400}, "targets": {"steps": 2, "bf16": False, "n_context_templates": 1}}


def _case(i: int, subject: str, target: str) -> EditCase:
    return EditCase(
        case_id=f"c{i}", subject=subject, relation="capital", prompt=f"The capital of {subject} is", target_new=target,
        probes=[Probe("paraphrase", f"{subject}'s capital is", target), Probe("locality", "Water boils at", "100 degrees")],
    )


def test_stream_measures_after_last_batch_and_restores_exactly(tiny_llama):
    # c3 re-edits c0's fact: the later edit wins, so c0 is not counted for retention.
    cases = [_case(0, "Tessaly", "Rome"), _case(1, "Borvik", "Oslo"), _case(2, "Quin", "Lima"), _case(3, "Tessaly", "Bern")]
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    seen = []
    result = run_stream(tiny_llama, get_editor("alphaedit", FAST), cases, batch_size=2, greedy=False,
                        restore=True, on_batch=seen.append, show_progress=False)
    assert [b.index for b in seen] == [0, 1] and [b.case_ids for b in result.batches] == [["c0", "c1"], ["c2", "c3"]]
    for key in ("efficacy_acc", "paraphrase_acc", "locality", "retention_acc", "immediate_efficacy_acc",
                "immediate_paraphrase_acc", "retention_paraphrase_acc"):
        assert 0.0 <= result.metrics[key] <= 1.0
    assert all("immediate_paraphrase_acc" in b.metrics for b in result.batches)
    assert result.fingerprint == tiny_llama.fingerprint and result.n_cases == 4
    assert result.seconds_per_edit > 0 and result.peak_rss_mb > 0
    assert result.config["method"] == "alphaedit"
    after = tiny_llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)



def test_a_stream_that_is_not_restored_keeps_no_rollback_records(tiny_llama):
    """Without `restore`, no batch will be undone: the stream holds neither copies of the old
    weights nor the editor's rollback records, however many batches it applies."""
    cases = [_case(i, s, t) for i, (s, t) in enumerate([("Tessaly", "Rome"), ("Borvik", "Oslo"), ("Quin", "Lima"),
                                                          ("Marrow", "Kyiv")])]
    editor = get_editor("alphaedit", FAST)
    result = run_stream(tiny_llama, editor, cases, batch_size=2, greedy=False, show_progress=False)
    assert [b.case_ids for b in result.batches] == [["c0", "c1"], ["c2", "c3"]]
    assert not editor._batch_keys and not editor._batch_facts and editor.n_edits == 4
