"""Where does locality go? A diagnostic for the quality floor's locality figure.

Runs a sequential edit stream (default: 100 zsRE edits in batches of 10, AlphaEdit
defaults) and then compares the edited model with the unedited one at every answer
position of the cases' locality questions (the positions the `locality` metric scores):

- how many positions flipped their top-1 token, and how confident the unedited model was
  there (its top-1 probability and its top-1 minus top-2 margin);
- token agreement restricted to positions where the unedited model had a clear favourite
  (margin above 0.05 / 0.1 / 0.2 / 0.3): flips among near-ties are a different failure from
  flips of answers the model knew;
- how many flips went to a token of some edit's new answer (leakage of the edited targets);
- the mean KL divergence from the unedited distribution over those positions;
- how agreement falls batch by batch (the trajectory) and, for weight editors, how far each
  edited layer's weight has moved (||W - W0|| / ||W0||): whether locality is lost at once or
  accumulates, and where.

    KEDIT_HOME=... python benchmarks/locality_flips.py --method alphaedit --limit 100 --batch 10 \
        [--set solve.cov_weight=2000 ...]

Findings for the defaults are in docs/editing.md (third and fourth measurement rounds).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.benchmarks import read_dataset  # noqa: E402
from kedit_core.editor_settings import editor_from_settings  # noqa: E402
from kedit_core.editors.memit import MemitConfig, edit_site, resolve_layers  # noqa: E402
from kedit_core.evaluate import LOCALITY_KINDS  # noqa: E402
from kedit_core.model import LoadedModel, load_model  # noqa: E402
from kedit_core.scoring import EncodedPairs, encode_pairs  # noqa: E402
from stream_args import stream_parser  # noqa: E402



@torch.no_grad()
def answer_logits(lm: LoadedModel, enc: EncodedPairs, batch: int = 32) -> torch.Tensor:
    """Vocabulary logits at every answer position, in row order ([positions, vocab])."""
    out = []
    for s in range(0, enc.input_ids.shape[0], batch):
        ids, att, mask = enc.input_ids[s : s + batch], enc.attention_mask[s : s + batch], enc.answer_mask[s : s + batch]
        h = lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device)).last_hidden_state
        out.append(lm.model.get_output_embeddings()(h[mask.to(lm.device)]).float().cpu())
    return torch.cat(out)


def main() -> None:
    args = stream_parser(__doc__.split("\n")[0], limit=100).parse_args()

    lm = load_model(None, show_progress=False)
    cases = read_dataset(args.data, limit=args.limit)
    probes = [p for c in cases for p in c.probes if p.kind in LOCALITY_KINDS and p.kind != "locality_same" and p.answer.strip()]
    if not probes:
        raise SystemExit(f"{args.data}: no locality probes with an answer")
    enc = encode_pairs(lm, [p.prompt for p in probes], [p.answer for p in probes])
    base = answer_logits(lm, enc)
    editor = editor_from_settings(args.method, args.settings, "--set")
    layers = resolve_layers(editor.config, lm.model) if isinstance(editor.config, MemitConfig) else []
    w0 = {layer: edit_site(lm.model, layer).module.weight.detach().clone() for layer in layers}
    trajectory = []
    for s in range(0, len(cases), args.batch):
        editor.edit(lm, cases[s : s + args.batch])
        agree = float((answer_logits(lm, enc).argmax(-1) == base.argmax(-1)).float().mean())
        trajectory.append(agree)
        print(f"edited {min(s + args.batch, len(cases))}/{len(cases)}: agreement {agree:.3f}", flush=True)
    now = answer_logits(lm, enc)

    before, after = base.argmax(-1), now.argmax(-1)
    flip = before != after
    top2 = base.softmax(-1).topk(2).values
    margin = top2[:, 0] - top2[:, 1]
    targets = {t for c in cases for t in lm.tokenizer.encode(" " + c.target_new.strip(), add_special_tokens=False)}
    n, nf = len(before), int(flip.sum())
    print(f"\n{args.method}, {len(cases)} edits in batches of {args.batch}: {n} locality answer positions")
    print(f"token agreement (the locality metric): {1 - nf / n:.3f}  ({nf} flipped)")
    print(f"unedited top-1 probability: flipped {float(top2[flip, 0].mean()):.3f}, kept {float(top2[~flip, 0].mean()):.3f}")
    print(f"unedited top-1 minus top-2 margin: flipped {float(margin[flip].mean()):.3f}, kept {float(margin[~flip].mean()):.3f}")
    for q in (0.05, 0.1, 0.2, 0.3):
        sel = margin > q
        print(f"agreement where the margin > {q}: {1 - float(flip[sel].float().mean()):.3f} "
              f"({int(sel.sum())} positions = {float(sel.float().mean()):.0%})")
    leaked = sum(int(t) in targets for t in after[flip])
    print(f"flips to a token of some edit's new answer: {leaked} of {nf}")
    kl = torch.nn.functional.kl_div(now.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    print(f"mean KL(unedited || edited) per position: {float(kl.mean()):.4f} nats")
    print("agreement after each batch:", " ".join(f"{a:.3f}" for a in trajectory))
    for layer, w in w0.items():
        moved = float((edit_site(lm.model, layer).module.weight.detach() - w).norm() / w.norm())
        print(f"layer {layer}: ||W - W0|| / ||W0|| = {moved:.3f}")
    common = Counter(lm.tokenizer.decode([int(t)]) for t in after[flip]).most_common(10)
    print("most common new tokens:", ", ".join(f"{t!r} x{k}" for t, k in common))


if __name__ == "__main__":
    main()
