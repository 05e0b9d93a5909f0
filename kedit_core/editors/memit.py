"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023), read top to bottom.

The idea in four steps, for a batch of edits "subject -> new answer":

1. **Target vectors z.** For each case, find the residual-stream vector that the last
   edited layer L should output at the subject's last token so that the model says the new
   answer. We optimise a residual `delta` added there: minimise the NLL of the answer after
   the prompt wrapped in a few random-prefix context templates (so the edit does not
   depend on the exact wording before the subject), plus a KL term that keeps
   "{subject} is a" predicting what it predicted before (so the subject keeps its
   identity), plus weight decay on `delta`; the norm of `delta` is clamped and
   optimisation stops early once the answer is likely enough. z = h_L + delta.
   Optional `targets.prompt_variants` add rewordings of the prompt to those contexts (e.g.
   `subject_first`: "Munich: Who was the head of government of it?"), so the target must
   also work when the subject is not where the edit's own wording puts it.
2. **Keys.** At each edited layer l, the key of a case is the input of the MLP's output
   projection (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`) at the subject's last token,
   averaged over the contexts (MEMIT); with `solve.per_template_keys` each context's key is
   fitted on its own (weight 1/contexts), each to its own output plus the case's delta.
3. **Spread.** The remaining residual z - h_L(current weights) is split over the layers
   still to edit: layer i of n takes 1/(n - i) of what is left, edited lowest first, each
   seeing the edits below it.
4. **Closed form.** W_l += R K^T (lambda C + K K^T)^-1, with C = E[k k^T] the keys'
   second moment over generic text (`kedit_core.keystats`) weighted by lambda
   (`solve.cov_weight`). Solved in float64: C is badly conditioned and float32 loses
   the small directions that keep unrelated knowledge intact.

Speed on CPU: step 1 runs all cases of a batch in one forward/backward per step, and per
step only the layers above L over the tokens from the subject's last token on, with no
weight gradients and the weights in bfloat16 (`memit_speedups.py`: what each trick
skips and why the skipped work cannot depend on delta). How cases and their contexts
become token rows (prompt variants, the KL row, answer positions): `memit_rows.py`.

Subjects edited again (kedit's, `revisit_subjects`): cases of one subject share one delta
(always: `DeltaGroups`), so a later batch that edits a subject edited before would optimise
its delta for the new fact alone and could overwrite the subject's earlier facts (a second
Karlsruhe fact one batch later took the first from 1.00 to 0.38). The editor therefore
remembers the facts it wrote (its `state_dict`, persisted with each version) and adds a
revisited subject's other current facts to the batch as kept rows of that shared delta:
optimised and fitted like the batch's cases, not reported or counted as its edits.

AlphaEdit (`alphaedit.py`) reuses steps 1-3 and replaces the closed form in step 4.
"""
from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from kedit_core.anatomy import StopForward, decoder_layers, edit_site, stop_after
from kedit_core.editors.base import CaseDiagnostics, Editor, EditorConfig, EditResult, register
from kedit_core.editors.edit_scope import EditScope
from kedit_core.editors.memit_rows import EditRows, check_prompt_variants, encode_rows
from kedit_core.editors.memit_speedups import UpperLayers, UpperOutput, hidden_of
from kedit_core.editors.update_gate import install_update_gate, remove_update_gate
from kedit_core.keystats import key_second_moment
from kedit_core.model import LoadedModel
from kedit_core.routing import installed_update_gate
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta


# The most recent earlier facts of a revisited subject that join its batch as kept rows
# (was the setting `keep_facts_per_subject`, retired: docs/editing.md, "Retired settings").
KEEP_FACTS_PER_SUBJECT = 8


@dataclass
class TargetSettings:
    """Step 1, the target vectors: how each case's residual `delta` is optimised."""

    steps: int = 25  # max optimisation steps for the target vectors
    lr: float = 0.5  # Adam learning rate for delta
    clamp_norm_factor: float = 4.0  # ||delta|| <= factor * ||h_L||
    kl_factor: float = 0.0625  # weight of the "{subject} is a" KL term
    weight_decay: float = 0.5  # weight of ||delta|| / ||h_L||^2
    early_stop_nll: float = 0.05  # stop a case once its mean answer-token NLL is below this
    n_context_templates: int = 2  # "{}" plus n-1 random model-generated prefixes (2: paraphrase 0.80-0.87 at 2/3 the cost of 3)
    context_template_len: int = 10  # tokens per random prefix
    bf16: bool = True  # optimisation with the weights in bfloat16 (memit_speedups.weights_in); the solve stays float64
    prompt_variants: tuple[str, ...] = ()  # extra rewordings optimised alongside the templates (memit_rows.PROMPT_VARIANTS)

    def __post_init__(self) -> None:
        if isinstance(self.prompt_variants, str):  # `--set targets.prompt_variants=subject_first,chat`
            self.prompt_variants = tuple(v.strip() for v in self.prompt_variants.split(",") if v.strip())
        self.prompt_variants = tuple(self.prompt_variants)
        check_prompt_variants(self.prompt_variants)  # fail when configured, not mid-edit


@dataclass
class SolveSettings:
    """Steps 2-4, keys and the closed form: which keys are fitted, the key statistics C and
    how much C weighs against the batch's keys."""

    cov_weight: float = 1500.0  # lambda: weight of the key covariance C (preservation)
    keystats_samples: int = 20000  # token positions for C (docs/editing.md); the update gate's statistics too
    keystats_corpus: str | None = None  # text file; None = shipped corpus + model samples
    per_template_keys: bool = False  # fit every context template's key, not only their mean


@dataclass
class UpdateGateSettings:
    """The update gate (kedit_core/editors/update_gate.py, docs/editing.md "The update
    gate"): each edited layer's summed update acts only at token positions where it is
    larger than on the `quantile` of ordinary text (the key positions of every 7th paragraph
    of the key-statistics corpus, at most `positions`; 2,986 on the embedded model)."""

    quantile: float | None = None  # None = off: the plain method, the update acts everywhere
    positions: int = 4096
    # ... and never below the `chat_quantile` of the update's size on `chats` served chats
    # (questions the model asks itself, with its replies, in its chat template;
    # keystats.chat_keys): on chats the prose quantile let ~1% of positions through and
    # changed half of all unrelated replies (docs/editing.md, "Served answers"). 0 = prose only.
    chats: int = 192
    chat_quantile: float = 0.999
    # Gate each applied batch's update on its own (its own tau, fixed when it is applied)
    # instead of the summed update: over a long stream the summed update's tau grows with
    # it and blocks the early edits (docs/editing.md, "A thousand edits"). AlphaEdit's
    # default (thirteenth round); MEMIT has no gate by default.
    per_batch: bool = False
    # Per-batch only: raise every change's tau by one common factor so that the share of
    # ordinary positions where *any* change passes stays at 1 - quantile (and on served
    # chats at 1 - chat_quantile), as the summed gate's does; false: each change passes on
    # its own share, and B changes on up to B times as many (docs/editing.md, thirteenth round).
    per_batch_union: bool = True

    def __post_init__(self) -> None:
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise ValueError(f"update_gate.quantile must be between 0 and 1 (or null for no gate), got {self.quantile}")
        if not 0.0 < self.chat_quantile <= 1.0:
            raise ValueError(f"update_gate.chat_quantile must be in (0, 1], got {self.chat_quantile}")


@dataclass
class ScopeSettings:
    """The edit scope (kedit_core/editors/edit_scope.py, docs/editing.md "Served answers").
    Needs the update gate (the routing runs in its hooks)."""

    # A served question that names no subject this editor wrote a fact about and whose
    # all-MiniLM-L6-v2 cosine to every one of its edit questions is below `threshold` is
    # answered by the base layers (its reply is the unedited model's). None = no routing,
    # the update gate alone decides.
    threshold: float | None = None
    # ... and a question naming an edited subject is also asked with that subject's fact in
    # front whose question is nearest to it, if their cosine reaches `context` (the
    # retrieval baseline's template; the served memory, for what the weights miss). None: never.
    context: float | None = None
    # ... and the reply to a question with a fact in front is checked for that fact's value;
    # one without it is asked again on the base layers (the same fact in front), and the
    # second reply is served if it states the value (answer.py `keep_checked`).
    check: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "context"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"scope.{name} is a cosine similarity in [-1, 1] (or null for none), got {value}")


# Flat names of configs stored before the settings were grouped (ledgers, editor states),
# old -> new; `EditorConfig.from_dict` reads them, `--set` refuses them naming the new one.
MEMIT_OLD_NAMES: dict[str, str | None] = {
    "v_steps": "targets.steps",
    "v_lr": "targets.lr",
    "clamp_norm_factor": "targets.clamp_norm_factor",
    "kl_factor": "targets.kl_factor",
    "weight_decay": "targets.weight_decay",
    "early_stop_nll": "targets.early_stop_nll",
    "n_context_templates": "targets.n_context_templates",
    "context_template_len": "targets.context_template_len",
    "bf16": "targets.bf16",
    "prompt_variants": "targets.prompt_variants",
    "mom2_update_weight": "solve.cov_weight",
    "keystats_samples": "solve.keystats_samples",
    "keystats_corpus": "solve.keystats_corpus",
    "per_template_keys": "solve.per_template_keys",
    "update_gate": "update_gate.quantile",
    "update_gate_positions": "update_gate.positions",
    "update_gate_chats": "update_gate.chats",
    "update_gate_chat_quantile": "update_gate.chat_quantile",
    "update_gate_per_batch": "update_gate.per_batch",
    "edit_scope": "scope.threshold",
    "scope_context": "scope.context",
    "scope_check": "scope.check",
}
# Settled toggles (docs/editing.md, "Retired settings") and the value the code keeps.
MEMIT_RETIRED: dict[str, Any] = {"share_subject_delta": True, "keep_facts_per_subject": KEEP_FACTS_PER_SUBJECT}


@dataclass
class MemitConfig(EditorConfig):
    """MEMIT settings, grouped by concern: `targets` (step 1), `solve` (keys and the closed
    form), `update_gate` and `scope` (how the edited layers serve). Defaults are for the
    embedded SmolLM2-135M (30 layers); the measurements behind them are in docs/editing.md.
    `layers=None` scales the layer window to other depths."""

    method: ClassVar[str] = "memit"
    OLD_NAMES: ClassVar[dict[str, str | None]] = MEMIT_OLD_NAMES
    RETIRED: ClassVar[dict[str, Any]] = MEMIT_RETIRED
    layers: list[int] | None = None  # edited layers; None = auto (see `default_layers`)
    # A subject edited in an earlier batch (the nightly pipeline meets them daily: a city's
    # population next year, a second fact of an item): its earlier facts that still hold
    # (at most KEEP_FACTS_PER_SUBJECT, the most recent) join the batch as kept rows of the
    # subject's shared delta, so the new delta keeps them (docs/editing.md, "Subjects edited
    # again"). AlphaEdit also stops preserving those earlier facts' own keys in the solve.
    revisit_subjects: bool = True
    targets: TargetSettings = field(default_factory=TargetSettings)
    solve: SolveSettings = field(default_factory=SolveSettings)
    update_gate: UpdateGateSettings = field(default_factory=UpdateGateSettings)
    scope: ScopeSettings = field(default_factory=ScopeSettings)

    @classmethod
    def as_stored(cls, d: dict[str, Any], nested: dict[str, Any]) -> dict[str, Any]:
        """Update gate settings a stored config predates keep the gate it was applied with:
        no `per_batch` (flat configs from before it) is the summed gate, no
        `per_batch_union` (every config before the thirteenth round) gates each change on its
        own share. Only a stored config says what it predates: a flat one (the old
        `update_gate` name) or a whole `update_gate` group as `to_dict` wrote it; partial
        settings (`--set`, tests) take today's defaults."""
        gate = d.get("update_gate")
        whole = isinstance(gate, dict) and {"quantile", "positions", "chats", "chat_quantile"} <= set(gate)
        flat = "update_gate" in d and not isinstance(gate, dict)
        if whole or flat:
            stored = nested.setdefault("update_gate", {})
            stored.setdefault("per_batch", False)
            stored.setdefault("per_batch_union", False)
        return nested

    def stronger(self) -> MemitConfig:
        out = copy.deepcopy(self)  # no group shared with this config
        out.targets.steps *= 2
        out.targets.clamp_norm_factor *= 1.5
        return out


def default_layers(n_layers: int) -> list[int]:
    """Early-middle window (10%-24% of depth): layers 3-7 on SmolLM2-135M's 30 layers, where
    edits reached efficacy 1.0 / paraphrase 0.87 (docs/editing.md); MEMIT's 7B setting
    (4-8 with covariance weight 15000) is known to fail on this model."""
    lo, hi = round(n_layers * 0.10), round(n_layers * 0.24)
    hi = max(hi, lo)
    return list(range(max(lo, 0), min(hi, n_layers - 1) + 1))


# --------------------------------------------------------------------------- where to edit
# (decoder_layers, edit_site, EditSite: kedit_core/anatomy.py, found by structure)


def resolve_layers(cfg: MemitConfig, model: torch.nn.Module) -> list[int]:
    n = len(decoder_layers(model))
    layers = sorted(cfg.layers) if cfg.layers is not None else default_layers(n)
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"layers {layers} out of range for a {n}-layer model")
    return layers


# --------------------------------------------------------------------------- step 1: target vectors

_TEMPLATE_CACHE: dict[tuple, list[str]] = {}
_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def context_templates(lm: LoadedModel, n: int, length: int, seed: int = 0) -> list[str]:
    """"{}" plus n-1 short random prefixes sampled from the model itself (top-k 5), as in
    MEMIT: the edit must work whatever text precedes the prompt."""
    key = (lm.fingerprint, n, length, seed)
    if key in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[key]
    templates = ["{}"]
    tok, model, device = lm.tokenizer, lm.model, lm.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for j in range(n - 1):
        ids = tok.encode(_STARTS[j % len(_STARTS)], add_special_tokens=False)
        for _ in range(length):  # a 10-token loop without KV cache: simple and arch-agnostic
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = logits.topk(5)
            ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]))
        text = tok.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ")
        templates.append(" ".join(text.split()) + ". {}")
    _TEMPLATE_CACHE[key] = templates
    return templates


@dataclass
class Targets:
    z: torch.Tensor  # [n_cases, H] float32: h_L + delta
    z_init: torch.Tensor  # [n_cases, H] h_L at the subject's last token (bare prompt)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)


# The signature of step 1, so benchmarks can hand the editor another implementation.
TargetFn = Callable[[LoadedModel, EditRows, int, MemitConfig], Targets]


@dataclass
class DeltaGroups:
    """Which delta each case optimises: one per subject (cases of one subject move together
    and stop together). Wikidata revisions often change several facts of one item; where
    the subject opens the prompt ("Lena Hartmann is an instance of", and every
    `subject_first` row) its key is the same for all of them, so separate deltas would ask
    one key for contradicting outputs and the closed form would average them (demo batch:
    one of two such facts lost, efficacy 0.00). Cases without a subject group (rows encoded
    without one) get a delta each."""

    of_case: torch.Tensor  # [n_cases] the group of each case (CPU)
    of_case_d: torch.Tensor  # the same on the model's device
    size: torch.Tensor  # [n_groups] cases per group
    init_norm: torch.Tensor  # [n_groups] mean ||h_L|| of the group's cases: the scale of its clamp
    n: int

    @classmethod
    def of(cls, rows: EditRows, init_norm: torch.Tensor) -> DeltaGroups:
        device = init_norm.device
        group = rows.subject_group if rows.subject_group is not None else torch.arange(rows.n_cases)
        n_groups = int(group.max()) + 1
        group_d = group.to(device)
        size = torch.bincount(group, minlength=n_groups).to(device)
        norm = torch.zeros(n_groups, device=device).index_add_(0, group_d, init_norm) / size
        return cls(group, group_d, size, norm, n_groups)


def answer_nll(out: UpperOutput, n: int) -> torch.Tensor:
    """Per case [n]: the NLL of its answer tokens, a mean over answer tokens and contexts."""
    logp, token, weight, case = out.answer_logprobs()
    tok_nll = -logp.gather(1, token[:, None]).squeeze(1)
    return torch.zeros(n, device=logp.device).index_add(0, case, tok_nll * weight)


def compute_targets(lm: LoadedModel, rows: EditRows, z_layer: int, cfg: MemitConfig) -> Targets:
    """Optimise one residual per subject (`DeltaGroups`), all cases in one batched
    forward/backward per step (how that is cheap: memit_speedups.py). Reads `cfg.targets`."""
    t = cfg.targets
    n, device = rows.n_cases, lm.device
    upper = UpperLayers(lm, rows, z_layer, t.bf16)
    bare = (rows.template_of_row == 0).nonzero()[:, 0].to(device)  # one per case, in case order
    z_init = upper.output_at_subject(bare).float()
    init_norm = z_init.norm(dim=1)  # [n]
    groups = DeltaGroups.of(rows, init_norm)
    delta_g = torch.zeros(groups.n, z_init.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta_g], lr=t.lr)
    done_g = torch.zeros(groups.n, dtype=torch.bool)
    steps = [0] * n
    curves: list[list[float]] = [[] for _ in range(n)]
    last: dict[str, torch.Tensor] = {}
    kl_init: torch.Tensor | None = None

    with upper.optimising():
        for step in range(t.steps + 1):
            done = done_g[groups.of_case]
            active = (~done).nonzero()[:, 0]
            if len(active) == 0:
                break
            delta = delta_g[groups.of_case_d]  # [n, H], each case's view of its group's delta
            out = upper.run(delta, ~done)

            # The objective, per case: NLL of the new answer in every context ...
            nll = answer_nll(out, n)
            # ... plus KL on "{subject} is a" to what the unedited model predicted (the subject keeps its identity) ...
            k_logp = out.kl_logprobs()
            if kl_init is None:  # step 0: delta is zero, so this is the unedited distribution
                kl_init = k_logp.detach()
            kl = torch.zeros(n, device=device)
            kl[active.to(device)] = F.kl_div(k_logp, kl_init[active.to(device)], log_target=True, reduction="none").sum(-1)
            # ... plus weight decay on ||delta|| relative to ||h_L||^2, counted once per group.
            wd = t.weight_decay * delta.norm(dim=1) / init_norm**2 / groups.size[groups.of_case_d]
            loss = nll + t.kl_factor * kl + wd

            for c in active.tolist():
                curves[c].append(float(loss[c].detach()))
            last = {"nll": nll.detach(), "kl": kl.detach()}
            # a group has converged when every case in it has
            pending = (nll.detach().cpu() >= t.early_stop_nll).long()
            newly_g = torch.zeros(groups.n, dtype=torch.long).index_add_(0, groups.of_case, pending) == 0
            if step == t.steps:
                break
            update_g = (~done_g) & ~newly_g
            done_g |= newly_g
            if not update_g.any():
                break
            update = _adam_step(opt, delta_g, loss, update_g, groups, t.clamp_norm_factor)
            for c in update.nonzero()[:, 0].tolist():
                steps[c] += 1

    done = done_g[groups.of_case]
    d = delta_g.detach()[groups.of_case_d]
    z = z_init + d
    diags = [
        {
            "loss_curve": curves[c],
            "steps": steps[c],
            "target_norm": float(z[c].norm()),
            "delta_norm": float(d[c].norm()),
            "init_norm": float(init_norm[c]),
            "final_nll": float(last["nll"][c]) if last else None,
            "converged": bool(done[c]),
        }
        for c in range(n)
    ]
    return Targets(z=z, z_init=z_init, diagnostics=diags)


def _adam_step(opt: torch.optim.Optimizer, delta_g: torch.Tensor, loss: torch.Tensor, update_g: torch.Tensor,
               groups: DeltaGroups, clamp_norm_factor: float) -> torch.Tensor:
    """One Adam step for the groups in `update_g`; the others keep their delta (Adam's
    momentum would move them), and every delta is clamped to `clamp_norm_factor` times its
    group's ||h_L||. Returns which cases were updated."""
    device = delta_g.device
    update = update_g[groups.of_case]
    opt.zero_grad(set_to_none=True)
    loss[update.to(device)].sum().backward()
    keep = delta_g.detach().clone()
    opt.step()
    with torch.no_grad():
        frozen = (~update_g).to(device)
        delta_g[frozen] = keep[frozen]
        max_norm = clamp_norm_factor * groups.init_norm
        norms = delta_g.norm(dim=1)
        scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
        delta_g.mul_(scale[:, None])
    return update


# --------------------------------------------------------------------------- step 2: keys


@torch.no_grad()
def row_keys_and_outputs(
    lm: LoadedModel, rows: EditRows, key_layers: list[int], z_layer: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward (stopping after `z_layer`) over the template rows (KL rows left out), in
    row order: per key layer, the MLP-output-projection input at the subject's last token
    ([R_t, inter]), and the output of `z_layer` there ([R_t, H]), both float64."""
    tmpl_rows = (rows.template_of_row >= 0).nonzero()[:, 0]
    idx = torch.arange(len(tmpl_rows), device=lm.device)
    lookup = rows.lookup[tmpl_rows].to(lm.device)
    raw: dict[int, torch.Tensor] = {}
    zout: dict[str, torch.Tensor] = {}
    handles = []
    for layer in key_layers:
        site = edit_site(lm.model, layer)

        def pre_hook(_m, args, layer=layer):
            raw[layer] = args[0][idx, lookup].detach().double()

        handles.append(site.module.register_forward_pre_hook(pre_hook))

    def out_hook(out):
        zout["z"] = hidden_of(out)[idx, lookup].detach().double()

    width = int(rows.lengths[tmpl_rows].max())
    try:
        with stop_after(lm.model, z_layer, out_hook):
            lm.model.base_model(
                input_ids=rows.input_ids[tmpl_rows, :width].to(lm.device),
                attention_mask=rows.attention_mask[tmpl_rows, :width].to(lm.device),
                use_cache=False,
            )
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return raw, zout["z"]


@torch.no_grad()
def keys_and_outputs(
    lm: LoadedModel, rows: EditRows, key_layers: list[int], z_layer: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """MEMIT's keys: per key layer, each case's key averaged over its templates
    ([n_cases, inter]); and the output of `z_layer` for the bare prompt ("{}") ([n_cases, H])."""
    raw, z = row_keys_and_outputs(lm, rows, key_layers, z_layer)
    tmpl = rows.template_of_row >= 0
    case_of = rows.case_of_row[tmpl].to(z.device)
    keys = {}
    for layer, k in raw.items():
        summed = torch.zeros(rows.n_cases, k.shape[1], dtype=k.dtype, device=k.device).index_add_(0, case_of, k)
        keys[layer] = summed / rows.n_templates
    bare = (rows.template_of_row[tmpl] == 0).to(z.device)
    return keys, z[bare]


def fitted_keys(
    lm: LoadedModel, rows: EditRows, key_layers: list[int], z_layer: int, per_template: bool
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The keys the closed form fits, already weighted, with the layer-`z_layer` outputs
    they currently produce and the case of each key.

    MEMIT fits one key per case, the mean over context templates. With `per_template`, every
    template row is its own key with weight 1/templates (keys and outputs are returned
    scaled by its square root, so K K^T keeps the scale of the mean-key solve): the update
    then has to work in every context it was optimised in, not only for their average."""
    if not per_template:
        keys, z = keys_and_outputs(lm, rows, key_layers, z_layer)
        return keys, z, torch.arange(rows.n_cases)
    raw, z = row_keys_and_outputs(lm, rows, key_layers, z_layer)
    w = rows.per_context_scale
    case_of = rows.case_of_row[rows.template_of_row >= 0]
    return {layer: k * w for layer, k in raw.items()}, z * w, case_of


# --------------------------------------------------------------------------- step 4: the closed form
# (step 3, spreading the residual over the layers lowest first, is `Memit.spread_updates`:
# it calls the closed form once per layer through `solve_update`, which AlphaEdit replaces)


def memit_solve(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """Delta W [H, inter] = R K^T (lam C + K K^T)^-1 in float64.

    keys [n, inter], resid [n, H], cov [inter, inter] = E[k k^T] over generic text."""
    K = keys.double().T  # [inter, n]
    C = cov.double().to(K.device)
    # A tiny ridge keeps A invertible when C was estimated from fewer positions than its size.
    ridge = 1e-8 * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    A = lam * (C + ridge) + K @ K.T
    adj = torch.linalg.solve(A, K)  # [inter, n] = A^-1 K (A is symmetric)
    return resid.double().T @ adj.T


# --------------------------------------------------------------------------- the editor


@dataclass
class EditBatch:
    """What one `edit` call hands from step to step (targets, spread and solve, after_edit),
    passed explicitly rather than left on the editor between calls."""

    token: str  # the batch's id in the editor's rollback records (EditResult.info["batch_token"])
    n_new: int  # the batch's own cases come first, kept facts of revisited subjects after them
    # the settings of this batch: the editor's config, or the one passed to this `edit` call
    # (inside a batch every step reads these, never `self.config`)
    config: MemitConfig
    # AlphaEdit: per layer, K K^T of the earlier facts of the batch's subjects, measured before
    # anything changes; the solve re-fits those facts instead of preserving them (alphaedit.py)
    lifted: dict[int, torch.Tensor] = field(default_factory=dict)


@register("memit")
class Memit(Editor):
    """MEMIT: batched closed-form edits of the MLP output projections of `layers`."""

    config_class: ClassVar[type[EditorConfig]] = MemitConfig

    def __init__(self, config: MemitConfig | None = None, compute_targets: TargetFn = compute_targets) -> None:
        super().__init__(config)
        self._cov: dict[tuple[str, int, str | None, int], torch.Tensor] = {}
        # Step 1 is a constructor argument so benchmarks/bench_editors.py can time a naive
        # per-case version against it (everything else the same).
        self.compute_targets = compute_targets
        # subject label -> relation -> [subject, prompt, answer, question]: the facts this editor put in
        # and that still hold (a later edit of the same relation replaces its entry)
        self.facts: dict[str, dict[str, list[str]]] = {}
        self._batch_facts: dict[str, dict[str, dict[str, list[str]] | None]] = {}  # token -> what it replaced
        self._scope: EditScope | None = None  # built from `facts` (edit_scope.py)

    # The one thing AlphaEdit changes: how a layer's residual becomes a weight update.
    def solve_update(self, lm: LoadedModel, layer: int, keys: torch.Tensor, resid: torch.Tensor,
                     batch: EditBatch) -> torch.Tensor:
        cfg = batch.config
        return memit_solve(keys, resid, self.covariance(lm, layer, cfg), cfg.solve.cov_weight)

    def start_batch(self, lm: LoadedModel, cases: list[EditCase], config: MemitConfig) -> EditBatch:
        """Hook run first in `edit`, before the gate is attached (AlphaEdit measures the keys
        of the batch subjects' earlier facts here)."""
        return EditBatch(token=uuid.uuid4().hex, n_new=len(cases), config=config)

    def after_edit(self, lm: LoadedModel, rows: EditRows, layers: list[int], batch: EditBatch) -> dict[str, Any]:
        """Hook run once the batch is applied (AlphaEdit records the new keys here)."""
        return {}

    def covariance(self, lm: LoadedModel, layer: int, config: MemitConfig | None = None) -> torch.Tensor:
        """E[k k^T] of the layer's MLP-output keys over generic text (cached in memory and on
        disk), as `config.solve` (default: the editor's own) asks for it."""
        cfg: MemitConfig = config or self.config  # type: ignore[assignment]
        corpus, samples = cfg.solve.keystats_corpus, cfg.solve.keystats_samples
        key = (lm.fingerprint, layer, corpus, samples)
        if key not in self._cov:
            layers = resolve_layers(cfg, lm.model)
            stats = key_second_moment(lm, layers, corpus=corpus, samples=samples)
            for l_, c in stats.items():
                self._cov[(lm.fingerprint, l_, corpus, samples)] = c.to(lm.device)
        return self._cov[key]

    # ----------------------------------------------------------------- facts it wrote

    def _facts_as_cases(self, label: str) -> list[EditCase]:
        """The facts this editor wrote about one subject, oldest first, as cases."""
        return [
            EditCase(case_id=f"kept:{label}:{rel}", subject=subject, relation=rel, prompt=prompt,
                     target_new=answer, source="kept")
            for rel, (subject, prompt, answer, *_question) in self.facts.get(label, {}).items()
        ]

    def remembered_facts(self, cases: list[EditCase]) -> list[EditCase]:
        """Every fact this editor wrote about the batch's subjects (including those the batch replaces)."""
        return [f for label in dict.fromkeys(c.subject.strip() for c in cases) for f in self._facts_as_cases(label)]

    def facts_to_keep(self, cases: list[EditCase]) -> list[EditCase]:
        """Earlier edits of the batch's subjects that still hold and that the batch does not
        replace (the most recent KEEP_FACTS_PER_SUBJECT per subject), as cases to optimise
        alongside (their answers are already in the model)."""
        replaced = {(c.subject.strip(), c.relation) for c in cases}
        keep: list[EditCase] = []
        for label in dict.fromkeys(c.subject.strip() for c in cases):
            earlier = [f for f in self._facts_as_cases(label) if (label, f.relation) not in replaced]
            keep += earlier[len(earlier) - KEEP_FACTS_PER_SUBJECT :]
        return keep

    def _record_facts(self, cases: list[EditCase]) -> dict[str, dict[str, list[str]] | None]:
        """Remember the batch's facts (latest per relation wins); returns what they replaced."""
        before: dict[str, dict[str, list[str]] | None] = {}
        for c in cases:
            label = c.subject.strip()
            if label not in before:
                before[label] = dict(self.facts[label]) if label in self.facts else None
            rels = self.facts.setdefault(label, {})
            rels.pop(c.relation, None)  # re-inserted last: most recent last
            rels[c.relation] = [c.subject, c.prompt, c.target_new, c.question or ""]
        return before

    def attach(self, lm: LoadedModel) -> None:
        """Install (or remove) the update gate the editor's config asks for."""
        cfg: MemitConfig = self.config  # type: ignore[assignment]
        g = cfg.update_gate
        if g.quantile is None:
            remove_update_gate(lm)
        else:
            install_update_gate(lm, resolve_layers(cfg, lm.model), g.quantile, corpus=cfg.solve.keystats_corpus,
                                positions=g.positions, samples=cfg.solve.keystats_samples,
                                served_chats=g.chats, served_quantile=g.chat_quantile, per_batch=g.per_batch,
                                union=g.per_batch_union)
        self.sync_scope(lm)

    def sync_scope(self, lm: LoadedModel) -> None:
        """Hang the scope of the facts this editor holds now on the installed gate."""
        cfg: MemitConfig = self.config  # type: ignore[assignment]
        gate = installed_update_gate(lm)
        if gate is None:
            return
        sc = cfg.scope
        if sc.threshold is None:
            gate.scope = None
        else:
            wanted = (sc.threshold, sc.context, sc.check)
            if self._scope is None or (self._scope.threshold, self._scope.context, self._scope.check) != wanted:
                self._scope = EditScope(sc.threshold, context=sc.context, check=sc.check)
            gate.scope = self._scope.sync(self.facts)

    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        """Edit `cases` (with the kept facts of any subject edited before) and remember them.

        `config` edits this batch with other settings (the regression gate's retry with
        `config.stronger()`); `self.config` is untouched. The update gate and the edit scope
        serve every batch on the edited layers, so `layers`, `update_gate` and `scope` follow
        the editor's own config: a `config` that differs there is refused."""
        cfg: MemitConfig = self.call_config(config)  # type: ignore[assignment]
        own: MemitConfig = self.config  # type: ignore[assignment]
        if (cfg.layers, cfg.update_gate, cfg.scope) != (own.layers, own.update_gate, own.scope):
            raise ValueError("edit(config=...): layers, update_gate and scope serve every batch and follow the "
                             "editor's own config; a per-call config may change the other settings only")
        cases = list(cases)
        batch = self.start_batch(lm, cases, cfg)
        self.attach(lm)
        if not cases:
            return EditResult(method=self.name, delta=WeightDelta(meta={"method": self.name}), applied=True)
        keep = self.facts_to_keep(cases) if cfg.revisit_subjects else []
        result = self._edit_batch(lm, cases + keep, batch)
        if keep:  # the kept facts are context for this batch, not its edits
            result.diagnostics = result.diagnostics[: len(cases)]
            result.delta.meta["cases"] = [c.case_id for c in cases]
            result.info["kept_facts"] = [c.case_id for c in keep]
        result.info["batch_token"] = batch.token
        self._batch_facts[batch.token] = self._record_facts(cases)
        self.sync_scope(lm)
        return result

    def rollback(self, lm: LoadedModel, result: EditResult) -> None:
        """Revert the weights exactly and forget the batch's facts."""
        super().rollback(lm, result)
        for label, facts in self._batch_facts.pop(result.info.get("batch_token", ""), {}).items():
            if facts is None:
                self.facts.pop(label, None)
            else:
                self.facts[label] = facts
        self.sync_scope(lm)

    def settle(self, result: EditResult) -> None:
        super().settle(result)
        self._batch_facts.pop(result.info.get("batch_token", ""), None)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name,
                "facts": {label: {rel: list(f) for rel, f in rels.items()} for label, rels in self.facts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # states written before kedit remembered facts have none: nothing to keep
        self.facts = {label: {rel: list(f) for rel, f in rels.items()} for label, rels in state.get("facts", {}).items()}
        self._batch_facts.clear()

    # ----------------------------------------------------------------- one closed-form edit

    def encode(self, lm: LoadedModel, cases: list[EditCase], config: MemitConfig | None = None) -> tuple[list[str], EditRows]:
        """The context templates and every (case, context) row, as `config` (default: the
        editor's own) makes them."""
        cfg: MemitConfig = config or self.config  # type: ignore[assignment]
        t = cfg.targets
        templates = context_templates(lm, t.n_context_templates, t.context_template_len, cfg.seed)
        return templates, encode_rows(lm, cases, templates, tuple(t.prompt_variants))

    def spread_updates(self, lm: LoadedModel, rows: EditRows, targets: Targets, layers: list[int],
                       batch: EditBatch) -> dict[str, torch.Tensor]:
        """Steps 2-4, lowest layer first: the keys under the edits made so far, this layer's
        share of the residual still left, the closed form (`solve_update`). Returns each
        edited parameter's addition; the weights themselves are left as they were."""
        model = lm.model
        z_layer = layers[-1]
        sites = [edit_site(model, l_) for l_ in layers]
        params = dict(model.named_parameters())
        originals = {s.param_name: params[s.param_name].detach().clone() for s in sites}
        tensors: dict[str, torch.Tensor] = {}
        per_template = batch.config.solve.per_template_keys
        try:
            with torch.no_grad():
                for i, site in enumerate(sites):
                    keys, cur_z, case_of = fitted_keys(lm, rows, [site.layer], z_layer, per_template)
                    if i == 0 and not per_template:
                        goal = targets.z.double()
                    elif i == 0:  # nothing edited yet: each row's target is its unedited output plus its case's delta
                        delta_z = (targets.z - targets.z_init).double()[case_of.to(cur_z.device)]
                        goal = cur_z + delta_z * rows.per_context_scale
                    resid = (goal - cur_z) / (len(sites) - i)  # this layer's share of what is left
                    upd = self.solve_update(lm, site.layer, keys[site.layer], resid, batch)  # [H, inter] float64
                    p = params[site.param_name]
                    upd = (upd.T if site.transposed else upd).to(p.dtype)
                    p.add_(upd)  # the layers above see this edit when their keys are computed
                    tensors[site.param_name] = upd
                # Hand the same additions to a WeightDelta so `revert` restores exact originals.
                for name, orig in originals.items():
                    params[name].copy_(orig)
        except BaseException:
            with torch.no_grad():
                for name, orig in originals.items():
                    params[name].copy_(orig)
            raise
        return tensors

    def _edit_batch(self, lm: LoadedModel, cases: list[EditCase], batch: EditBatch) -> EditResult:
        cfg = batch.config
        t0 = time.perf_counter()
        model = lm.model
        layers = resolve_layers(cfg, model)
        for l_ in layers:  # key statistics first: their progress bar should not interrupt editing
            self.covariance(lm, l_, cfg)
        templates, rows = self.encode(lm, cases, cfg)

        targets = self.compute_targets(lm, rows, layers[-1], cfg)  # step 1
        t_targets = time.perf_counter() - t0
        tensors = self.spread_updates(lm, rows, targets, layers, batch)  # steps 2-4

        delta = WeightDelta(
            tensors=tensors,
            meta={"method": self.name, "layers": layers, "cases": [c.case_id for c in cases], "config": cfg.to_dict()},
        )
        delta.apply(model)
        info = self.after_edit(lm, rows, layers, batch)
        diags = []
        for c, d in zip(cases, targets.diagnostics):
            diags.append(
                CaseDiagnostics(
                    case_id=c.case_id,
                    loss_curve=d["loss_curve"],
                    steps=d["steps"],
                    target_norm=d["target_norm"],
                    delta_norm=d["delta_norm"],
                    extra={k: d[k] for k in ("init_norm", "final_nll", "converged")},
                )
            )
        seconds = time.perf_counter() - t0
        return EditResult(
            method=self.name,
            delta=delta,
            diagnostics=diags,
            seconds=seconds,
            applied=True,
            info={
                "layers": layers,
                "weight_delta_norm": delta.norm(),
                "seconds_targets": t_targets,
                "seconds_update": seconds - t_targets,
                "templates": templates,
                **info,
            },
        )
