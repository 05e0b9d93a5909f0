"""Why MEMIT's target optimisation (step 1, `memit.compute_targets`) is fast on a CPU.

Each optimisation step asks one question: with `delta[c]` added to layer L's output at
the subject's last token of case c's rows, what does the model predict at the answer
positions and at the KL position? `UpperLayers` answers it at a fraction of the cost of a
full forward/backward, using what does NOT depend on delta:

- all cases of a batch are optimised together: ONE forward/backward per step over every
  case x context row (`memit.compute_targets` sums, not averages, the per-case losses so
  Adam sees exactly the per-case gradients; cases that reached the early-stop threshold
  leave the batch, and their rows leave the forward);
- nothing below layer L depends on delta, so layers 0..L run once; per step only layers
  L+1.. run (layers 0..L are temporarily swapped for stand-ins that replay the cached
  output of layer L, `replaying_below`), and the model's weights get no gradients (only
  delta does, `frozen_weights`), so the backward pass is about as cheap as the forward
  (attention on the plain math kernel: the CPU flash-attention backward is slow for these
  short rows);
- nothing BEFORE the subject's last token depends on delta either (causal attention):
  rows are re-padded so that token sits in one column for every row (`align_at_lookup`),
  the columns before it run once into a KV cache, and each step runs only the suffix
  (subject's last token, rest of the prompt, answer) - about 3x fewer tokens per step on
  zsRE;
- the vocabulary projection is computed only at the answer positions and the KL position;
- rows run in two passes of similar length where that saves more padding than a pass
  costs (`by_width`): a batch's chat rows are about three times as long as its other rows;
- `targets.bf16=True` holds the weights in bfloat16 for the optimisation (`weights_in`; the float32
  tensors are put back untouched), so the upper-layer forward/backward runs in bfloat16 on
  CPUs with AVX512-BF16 (~1.9x faster steps than float32); the closed-form solve always stays
  in float64.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kedit_core.anatomy import StopForward, decoder_layers, stop_after
from kedit_core.device import autocast_bf16
from kedit_core.editors.memit_rows import EditRows
from kedit_core.model import LoadedModel, kv_cache_kwargs, kv_cache_of


def hidden_of(layer_output: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether the layer returns a tuple (most) or a tensor."""
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients while optimising delta: the backward pass then computes only
    activation gradients (about half the work)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns `fn(hidden_states)` instead of computing it."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], as_tuple: bool) -> None:
        super().__init__()
        self.fn, self.as_tuple = fn, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.fn(hidden_states)
        return (out,) if self.as_tuple else out


@contextmanager
def weights_in(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The model's float32 parameters held in `dtype` for the duration (None: unchanged), the
    float32 tensors themselves put back on exit (bit-exact, nothing is rounded twice).

    Why not autocast: it re-casts every weight and activation around every matmul of every
    step, and keeps the residual stream in float32; with the weights in bfloat16 the whole
    upper-layer forward/backward runs in bfloat16 (~18% faster steps on the embedded model,
    docs/editing.md, twelfth round). Tied parameters (the embedding and the head) are one
    Parameter and are swapped once."""
    if dtype is None:
        yield
        return
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        for p in model.parameters():
            if p.dtype == torch.float32 and id(p) not in saved:
                saved[id(p)] = (p, p.data)
                p.data = p.data.to(dtype)
        yield
    finally:
        for p, original in saved.values():
            p.data = original


@contextmanager
def replaying_below(model: torch.nn.Module, layer: int, output_fn: Callable[[], torch.Tensor], as_tuple: bool) -> Iterator[None]:
    """Swap layers 0..layer for stand-ins: layers < `layer` pass their input through, layer
    `layer` returns `output_fn()` (the cached output plus delta). Restored on exit."""
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            layers[i] = _Replay(lambda h: h, as_tuple)
        layers[layer] = _Replay(lambda h: output_fn(), as_tuple)
        yield
    finally:
        for i, mod in enumerate(originals):
            layers[i] = mod


@dataclass
class Aligned:
    """Rows re-padded so every row's subject-last token sits in the same column `split`.

    Nothing before that token depends on delta (causal attention), so the columns before
    `split` are run once (their keys/values cached for every layer) and each step only
    runs the suffix - the subject's last token, the rest of the prompt and the answer -
    through the layers above L. On zsRE prompts with a context prefix that is ~3x fewer
    tokens per step."""

    input_ids: torch.Tensor  # [R, W] left-padded before `split`, right-padded after
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    split: int
    suffix_len: torch.Tensor  # [R] real tokens from `split` on


def align_at_lookup(rows: EditRows, pad: int) -> Aligned:
    n, look = rows.lengths, rows.lookup
    split = int(look.max())
    width = split + int((n - look).max())
    R = rows.input_ids.shape[0]
    ids = torch.full((R, width), pad, dtype=torch.long)
    att = torch.zeros((R, width), dtype=torch.long)
    for r in range(R):
        a = split - int(look[r])
        ids[r, a : a + int(n[r])] = rows.input_ids[r, : int(n[r])]
        att[r, a : a + int(n[r])] = 1
    pos = (att.cumsum(1) - 1).clamp_min(0)
    return Aligned(ids, att, pos, split, n - look)


class UpperLayers:
    """The batch's rows, run through the layers above `z_layer` with a delta added to its
    output at each row's subject-last token: built once per batch (every layer over the
    prefix columns into a KV cache, layers 0..L over the suffix columns), then `run` once per
    optimisation step."""

    @torch.no_grad()
    def __init__(self, lm: LoadedModel, rows: EditRows, z_layer: int, bf16: bool, pass_cost: float = 60.0) -> None:
        # bfloat16 steps are a float32 model's speed-up only (a bfloat16 model's weights are
        # in it already; a float16 model's must not be mixed with another half type).
        bf16 = autocast_bf16(lm.device, lm.dtype, bf16)
        self.model, self.device, self.rows, self.z_layer, self.bf16 = lm.model, lm.device, rows, z_layer, bf16
        self.pass_cost = pass_cost
        self.body, self.head = lm.model.base_model, lm.model.get_output_embeddings()
        device, body = self.device, self.body
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.aligned = al = align_at_lookup(rows, pad)
        self.ids, self.att, self.pos = al.input_ids.to(device), al.attention_mask.to(device), al.position_ids.to(device)
        S = al.split
        self.prefix_cache = None
        if S > 0:
            # In the steps' dtype (`weights_in`): a float32 cache was promoted (copied) in
            # every layer of every step, and copied whole per step at twice the size; and the
            # steps' attention needs its keys and values in its own dtype.
            with weights_in(self.model, torch.bfloat16 if bf16 else None):
                self.prefix_cache = kv_cache_of(body(
                    input_ids=self.ids[:, :S], attention_mask=self.att[:, :S], position_ids=self.pos[:, :S], use_cache=True
                ))
        captured: dict[str, Any] = {}

        def grab(out):
            captured["h"], captured["tuple"] = hidden_of(out).detach(), isinstance(out, tuple)

        try:
            with stop_after(self.model, z_layer, grab):
                body(input_ids=self.ids[:, S:], attention_mask=self.att, position_ids=self.pos[:, S:],
                     **kv_cache_kwargs(body, copy.deepcopy(self.prefix_cache)), use_cache=self.prefix_cache is not None)
        except StopForward:
            pass
        # [R, W - S, H] layer L's output over the suffix columns; column 0 is the subject's last token
        self.cached, self.as_tuple = captured["h"], captured["tuple"]
        self.case_of_row = rows.case_of_row.to(device)
        self.tgt_case = self.case_of_row[rows.tgt_row.to(device)]
        self.tgt_col = rows.tgt_pos - rows.lookup[rows.tgt_row]  # answer positions in suffix coordinates
        self.kl_col = rows.kl_pos - rows.lookup[rows.kl_row]

    def output_at_subject(self, row_index: torch.Tensor) -> torch.Tensor:
        """Layer L's unedited output at the subject's last token of these rows ([len, H])."""
        return self.cached[row_index, 0]

    @contextmanager
    def optimising(self) -> Iterator[None]:
        """Gradients for delta only, attention on its plain math kernel: for these few short
        rows the CPU flash-attention backward cost 15x its forward, a quarter of each step
        (math: ~20% faster steps on the embedded model, docs/editing.md, eighth round)."""
        with frozen_weights(self.model), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), \
                weights_in(self.model, torch.bfloat16 if self.bf16 else None):
            yield

    def run(self, delta: torch.Tensor, live: torch.Tensor) -> UpperOutput:
        """Rows of the `live` cases ([n] bool), `delta[c]` ([n, H]) added to case c's rows,
        through the layers above L, in up to two passes of rows of similar length (`by_width`)."""
        rows, device, al = self.rows, self.device, self.aligned
        R = self.ids.shape[0]
        live_rows = live[rows.case_of_row]
        sub = live_rows.nonzero()[:, 0]
        remap = torch.full((R,), -1, dtype=torch.long)  # row -> its index among the live rows
        remap[sub] = torch.arange(len(sub))
        lengths = al.suffix_len[sub]
        width = int(lengths.max())
        parts = [(part, self._pass(sub[part].to(device), int(lengths[part].max()), delta))
                 for part in by_width(lengths, self.pass_cost)]
        if len(parts) == 1:
            hidden = parts[0][1]
        else:  # stitched back in live-row order, padded to the widest part
            hidden = torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for _, h in parts])
            order = torch.cat([part for part, _ in parts])
            hidden = hidden[torch.argsort(order).to(device)]
        return UpperOutput(self, hidden, live, live_rows, remap)

    def _pass(self, rows_d: torch.Tensor, width: int, delta: torch.Tensor) -> torch.Tensor:
        """These rows' suffix columns (up to `width`) through the layers above L: [len, width, H]."""
        device, S = self.device, self.aligned.split
        h = self.cached[rows_d, :width]
        cases = self.case_of_row[rows_d]
        cache = None
        if self.prefix_cache is not None:
            cache = copy.deepcopy(self.prefix_cache)  # each pass appends its suffix to its own copy
            cache.batch_select_indices(rows_d)
        step_dtype = self.head.weight.dtype  # bfloat16 inside `optimising` when `bf16`

        def output_fn():
            first = (torch.arange(len(rows_d), device=device), torch.zeros(len(rows_d), dtype=torch.long, device=device))
            return h.index_put(first, delta[cases].to(h.dtype), accumulate=True).to(step_dtype)

        with replaying_below(self.model, self.z_layer, output_fn, self.as_tuple):
            return self.body(
                input_ids=self.ids[rows_d, S : S + width],
                attention_mask=self.att[rows_d, : S + width],
                position_ids=self.pos[rows_d, S : S + width],
                **kv_cache_kwargs(self.body, cache),
                use_cache=cache is not None,
            ).last_hidden_state


def by_width(lengths: torch.Tensor, pass_cost: float) -> list[torch.Tensor]:
    """The rows (indices into `lengths`) in one pass, or in two of similar length where that
    saves more padded positions than a pass costs (`pass_cost`, in positions). Rows of a batch
    differ by kind: the chat rows are about three times as long as the bare prompts and the
    "{subject} is a" rows, so one pass spent about half its positions on padding."""
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n, best, split = len(ls), float(len(ls) * ls[-1]), 0
    for k in range(1, n):
        cost = k * ls[k - 1] + (n - k) * ls[-1] + pass_cost
        if cost < best:
            best, split = cost, k
    return [torch.arange(n)] if split == 0 else [order[:split], order[split:]]


@dataclass
class UpperOutput:
    """One step's last hidden states of the live rows; vocabulary log-probs are projected
    only where the objective reads them (call `answer_logprobs` before `kl_logprobs`: the
    objective's autograd graph is built in that order)."""

    upper: UpperLayers
    hidden: torch.Tensor  # [live rows, width, H]
    live: torch.Tensor  # [n] bool
    live_rows: torch.Tensor  # [R] bool
    remap: torch.Tensor  # [R] index among the live rows (-1: not live)

    def _logprobs(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        head = self.upper.head
        return torch.log_softmax(head(self.hidden[row, col].to(head.weight.dtype)).float(), -1)

    def answer_logprobs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """At every answer position of the live rows: log-probs [N, V], the answer token
        [N], its weight [N] (1 / (answer length * contexts)) and its case [N]."""
        up, rows, device = self.upper, self.upper.rows, self.upper.device
        tsel = self.live_rows[rows.tgt_row].nonzero()[:, 0]
        logp = self._logprobs(self.remap[rows.tgt_row[tsel]].to(device), up.tgt_col[tsel].to(device))
        return logp, rows.tgt_tok[tsel].to(device), rows.tgt_weight[tsel].to(device), up.tgt_case[tsel.to(device)]

    def kl_logprobs(self) -> torch.Tensor:
        """At the last position of each live case's "{subject} is a" row: log-probs [live cases, V]."""
        up, rows, device = self.upper, self.upper.rows, self.upper.device
        active = self.live.nonzero()[:, 0]
        return self._logprobs(self.remap[rows.kl_row[active]].to(device), up.kl_col[active].to(device))
