"""Where is paraphrase generalisation lost: in the target vector or in the weight edit?

For each batch of cases (edited on the unedited model and rolled back, so nothing
sequential is measured), three paraphrase figures (teacher-forced token accuracy):

- `base`: the unedited model;
- `inject`: the batch's optimised deltas added directly to the last edited layer's output
  at the subject's last token of the paraphrase, no weight edit: how far the target vector
  itself carries to another wording;
- `edit`: the real weight edit.

`inject` well below 1.0 means the target was fitted to one wording (more contexts help);
`edit` well below `inject` means the weight update does not reproduce the delta for the
paraphrase's key. Also printed: the cosine of prompt and paraphrase keys per edited layer.

    KEDIT_HOME=... python benchmarks/paraphrase_gap.py --method alphaedit --limit 50 [--set k=v ...]

Figures for kedit's settings are in docs/editing.md (third round).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.benchmarks import read_dataset  # noqa: E402
from kedit_core.anatomy import decoder_layers  # noqa: E402
from kedit_core.editor_settings import editor_from_settings  # noqa: E402
from kedit_core.editors import get_editor  # noqa: E402
from kedit_core.editors.memit import compute_targets, context_templates, keys_and_outputs, resolve_layers  # noqa: E402
from kedit_core.editors.memit_rows import encode_rows, subject_last_token  # noqa: E402
from kedit_core.model import LoadedModel, load_model  # noqa: E402
from kedit_core.scoring import token_accuracy  # noqa: E402
from kedit_core.types import EditCase  # noqa: E402
from stream_args import stream_parser  # noqa: E402



def injected_accuracy(lm: LoadedModel, layer: int, prompt: str, subject: str, answer: str, delta: torch.Tensor) -> float:
    """Token accuracy of `answer` after `prompt` with `delta` added to `layer`'s output at the
    subject's last token (one prompt at a time: the hook position differs per prompt)."""
    pos = subject_last_token(lm.tokenizer, prompt, prompt.rindex(subject) + len(subject))

    def hook(_m, _i, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, pos] += delta.to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = decoder_layers(lm.model)[layer].register_forward_hook(hook)
    try:
        return token_accuracy(lm, [prompt], [answer])[0]
    finally:
        handle.remove()


def main() -> None:
    args = stream_parser(__doc__.split("\n")[0], limit=50).parse_args()

    lm = load_model(None, show_progress=False)
    cases = [c for c in read_dataset(args.data, limit=args.limit) if c.probes_of("paraphrase")]
    cfg = editor_from_settings(args.method, args.settings, "--set").config
    layers = resolve_layers(cfg, lm.model)
    z_layer = layers[-1]
    templates = context_templates(lm, cfg.targets.n_context_templates, cfg.targets.context_template_len, cfg.seed)
    scores: dict[str, list[float]] = {"base": [], "inject": [], "edit": [], "efficacy_inject": [], "efficacy_edit": []}
    cosines: dict[int, list[float]] = {layer: [] for layer in layers}
    for s in range(0, len(cases), args.batch):
        batch = cases[s : s + args.batch]
        paras = [c.probes_of("paraphrase")[0].prompt for c in batch]
        answers = [c.target_new for c in batch]
        scores["base"] += token_accuracy(lm, paras, answers)
        targets = compute_targets(lm, encode_rows(lm, batch, templates, tuple(cfg.targets.prompt_variants)), z_layer, cfg)
        deltas = targets.z - targets.z_init
        for c, p, d in zip(batch, paras, deltas):
            scores["inject"].append(injected_accuracy(lm, z_layer, p, c.subject, c.target_new, d))
            scores["efficacy_inject"].append(injected_accuracy(lm, z_layer, c.prompt, c.subject, c.target_new, d))
        as_cases = [EditCase(case_id=c.case_id + "-p", subject=c.subject, relation=c.relation, prompt=p,
                             target_new=c.target_new) for c, p in zip(batch, paras)]
        k_prompt, _ = keys_and_outputs(lm, encode_rows(lm, batch, ["{}"]), layers, z_layer)
        k_para, _ = keys_and_outputs(lm, encode_rows(lm, as_cases, ["{}"]), layers, z_layer)
        for layer in layers:
            cosines[layer] += torch.nn.functional.cosine_similarity(k_prompt[layer], k_para[layer]).tolist()
        editor = get_editor(args.method, cfg)  # fresh: no earlier edits in its state
        result = editor.edit(lm, batch)
        scores["edit"] += token_accuracy(lm, paras, answers)
        scores["efficacy_edit"] += token_accuracy(lm, [c.prompt for c in batch], answers)
        editor.rollback(lm, result)
        means = {k: round(sum(v) / len(v), 3) for k, v in scores.items()}
        print(f"{min(s + args.batch, len(cases))}/{len(cases)} cases: {means}", flush=True)
    print("\nparaphrase: " + ", ".join(f"{k} {sum(scores[k]) / len(scores[k]):.3f}" for k in ("base", "inject", "edit")))
    print("efficacy:   " + ", ".join(f"{k[9:]} {sum(scores[k]) / len(scores[k]):.3f}" for k in ("efficacy_inject", "efficacy_edit")))
    print("key cosine prompt vs paraphrase: " + ", ".join(f"L{layer} {sum(v) / len(v):.3f}" for layer, v in cosines.items()))


if __name__ == "__main__":
    main()
