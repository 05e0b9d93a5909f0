"""Fine-tuning baselines: constrained fine-tuning of one MLP layer (FT-L) and LoRA.

Both train on each case's own prompt -> new answer with the loss on the answer tokens
only (teacher forcing, the pairs encoded exactly as the evaluator scores them), all cases
of a batch together in minibatches, and continue from whatever the previous batches left
(continual fine-tuning: nothing is reset between batches).

- FT-L (Zhu et al. 2020, as in EasyEdit): only the MLP output projection of one layer
  (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`) is trained, and after every step its change
  in this batch is projected back into a norm ball: L-inf (each weight within +-bound of
  its value before the batch) or L2 (the whole change's Frobenius norm <= bound).
- LoRA (Hu et al. 2021) through `peft`: low-rank adapters on chosen modules, trained, then
  turned into a plain `WeightDelta` (peft's own `get_delta_weight`, in the base weight's
  layout) and the adapters unloaded, so apply / revert / save / the ledger work exactly as
  for MEMIT.

Exactness: training changes the weights in place; at the end the exact originals are put
back and the delta (trained - original) is applied through `WeightDelta.apply`. The served
weights are therefore `original + delta`, which can differ from the trained tensor by one
float rounding step, but they are exactly what a rebuild from the ledger produces.
"""
from __future__ import annotations

import logging
import random
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import torch

from kedit_core.anatomy import edit_site, edit_sites
from kedit_core.editors.base import CaseDiagnostics, Editor, EditorConfig, EditResult, register
from kedit_core.model import LoadedModel
from kedit_core.scoring import encode_pairs, hidden_and_head
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta

log = logging.getLogger(__name__)

# LoRA module names are given in Llama terms; GPT-2 calls them differently.
_GPT2_NAMES = {"down_proj": "mlp.c_proj", "up_proj": "mlp.c_fc", "gate_proj": "mlp.c_fc", "q_proj": "attn.c_attn",
               "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj"}


def mlp_out_params(model: torch.nn.Module) -> dict[int, str]:
    """Layer index -> parameter name of that layer's MLP output projection (kedit_core/anatomy.py)."""
    return {site.layer: site.param_name for site in edit_sites(model)}


def default_layer(model: torch.nn.Module) -> int:
    """About two thirds of the way up (EasyEdit's FT-L uses layer 21 of Llama-7B's 32)."""
    layers = sorted(mlp_out_params(model))
    return layers[min(len(layers) - 1, (2 * len(layers)) // 3)]


# --------------------------------------------------------------------------- shared trainer


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)  # mean loss per optimiser step
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"  # steps | loss | time


def train_on_pairs(
    lm: LoadedModel,
    prompts: list[str],
    answers: list[str],
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    batch_size: int = 16,
    stop_loss: float | None = None,
    max_seconds: float | None = None,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
    log_every: int = 0,
    desc: str = "train",
    weight_decay: float = 0.0,
) -> TrainReport:
    """Adam on `params` to make each answer follow its prompt; loss on answer tokens only.

    One step = one minibatch (the pairs are cycled in a shuffled order). Stops after
    `steps`, when the loss of a step falls under `stop_loss`, or after `max_seconds`.
    """
    if not prompts:
        return TrainReport()
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    body, head = hidden_and_head(lm)
    rng = random.Random(seed)
    order: list[int] = []
    report = TrainReport()
    t0 = time.perf_counter()
    device = lm.device
    was_training = lm.model.training
    lm.model.eval()  # no dropout: an edit should be deterministic
    try:
        for step in range(steps):
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            idx, order = order[:batch_size], order[batch_size:]
            enc = encode_pairs(lm, [prompts[i] for i in idx], [answers[i] for i in idx])
            with torch.enable_grad():
                hidden = body(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device)).last_hidden_state
                mask = enc.answer_mask.to(device)
                logits = head(hidden[mask]).float()  # only answer positions hit the vocabulary
                loss = torch.nn.functional.cross_entropy(logits, enc.targets.to(device)[mask])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            loss_value = loss.detach().item()
            report.losses.append(loss_value)
            report.steps = step + 1
            elapsed = time.perf_counter() - t0
            if log_every and (step + 1) % log_every == 0:
                log.info("%s: step %d/%d loss %.4f (%.2f steps/s)", desc, step + 1, steps, loss_value, (step + 1) / elapsed)
            if stop_loss is not None and loss_value < stop_loss:
                report.stopped = "loss"
                break
            if max_seconds is not None and elapsed > max_seconds:
                report.stopped = "time"
                break
    finally:
        opt.zero_grad(set_to_none=True)
        lm.model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def case_pairs(cases: list[EditCase]) -> tuple[list[str], list[str]]:
    """What the fine-tuning baselines train on: each case's own prompt -> new answer."""
    return [c.prompt for c in cases], [c.target_new for c in cases]


def _grad_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Every parameter's requires_grad, to restore after training froze all but a few."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _restore_grad_flags(model: torch.nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


# --------------------------------------------------------------------------- FT-L


@dataclass
class FTConfig(EditorConfig):
    method: ClassVar[str] = "ft"
    layer: int | None = None  # None: about 2/3 of the depth (default_layer)
    norm: str = "linf"  # "linf": each weight within +-norm_bound; "l2": ||change||_F <= norm_bound
    norm_bound: float = 5e-3  # per batch, around the weights the batch started from
    lr: float = 5e-4
    steps: int = 40
    batch_size: int = 16
    stop_loss: float | None = 1e-2
    max_seconds: float | None = None

    def stronger(self) -> FTConfig:
        return replace(self, steps=self.steps * 2, norm_bound=self.norm_bound * 2)


@register("ft")
class FTEditor(Editor):
    config_class = FTConfig
    config: FTConfig

    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        cfg = self.call_config(config)  # this call's settings (base.Editor.edit)
        if cfg.norm not in ("linf", "l2"):
            raise ValueError(f"ft: norm must be 'linf' or 'l2', not {cfg.norm!r}")
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        names = mlp_out_params(lm.model)
        layer = default_layer(lm.model) if cfg.layer is None else cfg.layer
        if layer not in names:
            raise ValueError(f"ft: layer {layer} has no MLP output projection; layers: {sorted(names)}")
        pname = names[layer]
        param = dict(lm.model.named_parameters())[pname]
        original = param.detach().clone()
        flags = _grad_flags(lm.model)
        try:
            for p in lm.model.parameters():
                p.requires_grad_(False)
            param.requires_grad_(True)

            @torch.no_grad()
            def project() -> None:  # keep this batch's change inside the norm ball
                change = param - original
                if cfg.norm == "linf":
                    change.clamp_(-cfg.norm_bound, cfg.norm_bound)
                else:
                    n = change.norm()
                    if n > cfg.norm_bound:
                        change.mul_(cfg.norm_bound / n)
                param.copy_(original + change)

            prompts, answers = case_pairs(cases)
            rep = train_on_pairs(lm, prompts, answers, [param], cfg.steps, cfg.lr, cfg.batch_size,
                                 cfg.stop_loss, cfg.max_seconds, after_step=project, seed=cfg.seed, desc="ft")
            with torch.no_grad():
                delta_t = (param.detach() - original).clone()
                param.copy_(original)  # exact original back, then apply the delta like any editor
        finally:
            _restore_grad_flags(lm.model, flags)
        delta = WeightDelta({pname: delta_t}, meta={"method": "ft", "layer": layer, "norm": cfg.norm,
                                                    "norm_bound": cfg.norm_bound, "cases": [c.case_id for c in cases]})
        delta.apply(lm.model)
        diag = [CaseDiagnostics(case_id=c.case_id, steps=rep.steps) for c in cases]
        if diag:
            diag[0].loss_curve = rep.losses  # one curve per batch (the cases train together)
            diag[0].delta_norm = delta.norm()
        return EditResult(method="ft", delta=delta, diagnostics=diag, seconds=time.perf_counter() - t0, applied=True,
                          info={"layer": layer, "param": pname, "steps": rep.steps, "stopped": rep.stopped,
                                "final_loss": rep.losses[-1] if rep.losses else None,
                                "linf": float(delta_t.abs().max()), "l2": float(delta_t.norm())})


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoRAConfig(EditorConfig):
    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])  # down_proj: the MLP output, found by structure
    layers: list[int] | None = None  # None: every layer
    lr: float = 5e-3
    steps: int = 40
    batch_size: int = 16
    stop_loss: float | None = 1e-2
    max_seconds: float | None = None

    def stronger(self) -> LoRAConfig:
        return replace(self, steps=self.steps * 2)


def lora_target_regex(model: torch.nn.Module, modules: list[str], layers: list[int] | None) -> str:
    """A peft `target_modules` regex for the chosen module kinds in the chosen layers.

    "down_proj" (the default) is the MLP output projection found by structure
    (anatomy.edit_site: `mlp.c_proj` in GPT-2, `mlp.dense_4h_to_h` in GPT-NeoX, ...), so the
    default works for every family the editors support; other names are module names
    (GPT-2's mapped from the Llama ones), checked to match something in `check_lora_targets`."""
    arch = getattr(model.config, "model_type", "")
    mlp_out = _layer_relative(edit_site(model, 0).param_name.removesuffix(".weight"))
    names = sorted({mlp_out if m == "down_proj" else (_GPT2_NAMES.get(m, m) if arch == "gpt2" else _fused(model, m))
                    for m in modules})
    layer_part = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    return rf".*\.{layer_part}\.(?:[^.]+\.)*(?:{'|'.join(re.escape(n) for n in names)})$"


# Families that compute queries, keys and values in one projection (Phi-3, GPT-NeoX, Baichuan):
# a q_proj / k_proj / v_proj target means that projection there (GPT-2's c_attn: _GPT2_NAMES).
_FUSED_QKV = ("qkv_proj", "query_key_value", "W_pack")


def _fused(model: torch.nn.Module, name: str) -> str:
    if name not in ("q_proj", "k_proj", "v_proj"):
        return name
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if name in leaves:
        return name
    return next((f for f in _FUSED_QKV if f in leaves), name)


def _layer_relative(module_name: str) -> str:
    """"model.layers.0.mlp.down_proj" -> "mlp.down_proj": the path inside a decoder layer."""
    return re.sub(r"^.*?\.\d+\.", "", module_name, count=1)


def check_lora_targets(model: torch.nn.Module, modules: list[str], layers: list[int] | None) -> None:
    """Fail in one line when a target name matches no module of this model (peft's own
    error names neither the model nor what it has; a name that matches nothing next to one
    that does would be dropped silently)."""
    names = [n for n, _ in model.named_modules()]
    missing = [m for m in modules if not any(re.fullmatch(lora_target_regex(model, [m], layers), n) for n in names)]
    if missing:
        layer0 = sorted({_layer_relative(n) for n in names if re.search(r"\.0\.[^.]+", n) and _layer_relative(n) != n})
        raise ValueError(f"LoRA target_modules {missing} match no module of this {type(model).__name__}; "
                         f"its layers hold: {', '.join(layer0[:16])}")


def train_lora_delta(
    lm: LoadedModel,
    prompts: list[str],
    answers: list[str],
    rank: int,
    alpha: float,
    target_modules: list[str],
    layers: list[int] | None,
    steps: int,
    lr: float,
    batch_size: int,
    stop_loss: float | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    log_every: int = 0,
    desc: str = "lora",
) -> tuple[WeightDelta, TrainReport]:
    """Train LoRA adapters on (prompt -> answer), return them as a plain delta, and leave
    `lm.model` exactly as it was (adapters unloaded, no weight changed)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    flags = _grad_flags(lm.model)
    regex = lora_target_regex(lm.model, target_modules, layers)
    check_lora_targets(lm.model, target_modules, layers)
    peft_cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                          target_modules=regex,
                          fan_in_fan_out=getattr(lm.model.config, "model_type", "") == "gpt2")
    # get_peft_model injects the adapters into lm.model in place; unload() takes them out.
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(lm.model, peft_cfg)
    try:
        trainable = [p for p in lm.model.parameters() if p.requires_grad]
        rep = train_on_pairs(lm, prompts, answers, trainable, steps, lr, batch_size, stop_loss, max_seconds,
                             seed=seed, log_every=log_every, desc=desc)
        tensors = {}
        with torch.no_grad():
            for name, module in lm.model.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    # peft's delta in the base weight's own layout (handles GPT-2's Conv1D)
                    tensors[f"{name}.weight"] = module.get_delta_weight("default").detach().clone()
    finally:
        peft_model.unload()
        _restore_grad_flags(lm.model, flags)
    return WeightDelta(tensors), rep


@register("lora")
class LoRAEditor(Editor):
    config_class = LoRAConfig
    config: LoRAConfig

    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        cfg = self.call_config(config)  # this call's settings (base.Editor.edit)
        t0 = time.perf_counter()
        prompts, answers = case_pairs(cases)
        delta, rep = train_lora_delta(lm, prompts, answers, cfg.rank, cfg.alpha, list(cfg.target_modules), cfg.layers,
                                      cfg.steps, cfg.lr, cfg.batch_size, cfg.stop_loss, cfg.max_seconds, cfg.seed)
        delta.meta = {"method": "lora", "rank": cfg.rank, "targets": list(cfg.target_modules),
                      "cases": [c.case_id for c in cases]}
        delta.apply(lm.model)
        diag = [CaseDiagnostics(case_id=c.case_id, steps=rep.steps) for c in cases]
        if diag:
            diag[0].loss_curve = rep.losses
            diag[0].delta_norm = delta.norm()
        return EditResult(method="lora", delta=delta, diagnostics=diag, seconds=time.perf_counter() - t0, applied=True,
                          info={"steps": rep.steps, "stopped": rep.stopped, "modules": len(delta.tensors),
                                "final_loss": rep.losses[-1] if rep.losses else None})
