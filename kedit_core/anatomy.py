"""Model anatomy: where a causal LM keeps its decoder blocks and the matrices kedit edits,
found from the module tree rather than from the model's name.

Every weight editor (MEMIT, AlphaEdit, FT), the key statistics (`keystats`) and the update
gate (`editors/update_gate.py`) ask this module, and only this module, where things are:

- `decoder_layers(model)`: the decoder blocks, the `nn.ModuleList` whose length is the
  config's layer count (`num_hidden_layers`; GPT-2's `n_layer` is the same attribute);
- `edit_site(model, layer)`: the MLP output projection of one block, the matrix MEMIT and
  AlphaEdit edit: the one linear map in the block (an `nn.Linear`, or transformers'
  `Conv1D` whose weight is stored transposed) that reads the MLP's intermediate width
  (`intermediate_size`, GPT-2 `n_inner`, else 4x hidden) and writes the hidden width.
  Attention's output projection writes the hidden width too but reads the heads' width,
  and the MLP's input projections (also fused ones, Phi-3's `gate_up_proj`) write the
  intermediate width, so neither is taken for it;
- `stop_after(model, layer)` / `StopForward`: run a forward only up to one decoder block
  (key statistics and MEMIT's keys need nothing above it).

Names play no part in the decision: the same rule finds Llama/Mistral/Qwen2/Gemma/Phi-3
`mlp.down_proj`, GPT-2 `mlp.c_proj` and GPT-NeoX `mlp.dense_4h_to_h` (tests/unit/
test_architectures.py builds a tiny model of each). A model it cannot read fails with a
`KeditError` that says what was missing (e.g. "no decoder layer list of length 30 in Foo").

This module sits at the top of `kedit_core` (not under `kedit_core/editors/`) because
importing anything under `editors/` first runs that package's `__init__`, which imports
every editor; `keystats` must be importable without the editors. It imports nothing of
kedit's but `errors`, so everything can import it at top level without a cycle.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from kedit_core.errors import KeditError


class AnatomyError(KeditError):
    """The model's layout is not one kedit can edit; the message names what was not found."""


@dataclass
class EditSite:
    """The MLP output projection of one decoder layer, the matrix MEMIT edits."""

    layer: int
    module: torch.nn.Module  # down_proj / c_proj / dense_4h_to_h ...
    param_name: str  # name in model.named_parameters()
    transposed: bool  # GPT-2 Conv1D stores weight as [in, out]


def _config(model: torch.nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)  # multimodal configs nest the decoder's
    return get_text() if callable(get_text) else cfg


def n_layers_of_config(model: torch.nn.Module) -> int | None:
    """The decoder's layer count as its config states it (None when it states none)."""
    n = getattr(_config(model), "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks: the `nn.ModuleList` in the module tree whose length is the
    config's `num_hidden_layers` (the shallowest one, should several have that length)."""
    n = n_layers_of_config(model)
    name = type(model).__name__
    if n is None:
        raise AnatomyError(f"{name}'s config states no layer count (num_hidden_layers): cannot find its decoder layers")
    found = [(path, mod) for path, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n]
    if not found:
        lists = [f"{p or '(root)'}[{len(m)}]" for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        raise AnatomyError(f"no decoder layer list of length {n} in {name}"
                           + (f" (module lists: {', '.join(lists[:8])})" if lists else " (it has no module lists)"))
    depth = min(path.count(".") for path, _ in found)
    top = [(path, mod) for path, mod in found if path.count(".") == depth]
    if len(top) > 1:
        raise AnatomyError(f"several module lists of length {n} in {name} could be its decoder layers: "
                           f"{', '.join(p for p, _ in top)}")
    return top[0][1]


def n_layers(model: torch.nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_width(model: torch.nn.Module) -> int:
    """The residual stream's width (`hidden_size`; GPT-2's `n_embd` is the same attribute)."""
    hidden = getattr(_config(model), "hidden_size", None)
    if not isinstance(hidden, int) or hidden <= 0:
        raise AnatomyError(f"{type(model).__name__}'s config states no hidden width (hidden_size): "
                           "cannot find its MLP output projections")
    return hidden


def mlp_width(model: torch.nn.Module) -> int:
    """The MLP's intermediate width: `intermediate_size` (GPT-2: `n_inner`, None = 4x hidden)."""
    cfg = _config(model)
    hidden = hidden_width(model)
    for attr in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden


def _widths(mod: torch.nn.Module) -> tuple[int, int, bool] | None:
    """(input width, output width, weight stored [in, out]) of a linear map, else None."""
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features, False
    weight = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1], True  # transformers' Conv1D: x @ W, W [in, out]
    return None


def edit_site(model: torch.nn.Module, layer: int) -> EditSite:
    """The MLP output projection of decoder layer `layer`: the block's one linear map from
    the MLP's intermediate width to the hidden width (module docstring)."""
    block = decoder_layers(model)[layer]
    hidden, inter = hidden_width(model), mlp_width(model)
    maps = [(path, mod, w) for path, mod in block.named_modules() if (w := _widths(mod)) is not None]
    hits = [(path, mod, w) for path, mod, w in maps if w[0] == inter and w[1] == hidden]
    where = f"layer {layer} ({type(block).__name__}) of {type(model).__name__}"
    if not hits:
        shapes = ", ".join(f"{p} {w[0]}->{w[1]}" for p, mod, w in maps[:12]) or "none"
        raise AnatomyError(f"no MLP output projection (a linear map {inter}->{hidden}: intermediate to hidden width) "
                           f"in {where}; its linear maps: {shapes}")
    if len(hits) > 1:
        raise AnatomyError(f"several linear maps {inter}->{hidden} in {where} could be its MLP output projection: "
                           f"{', '.join(p for p, _, _ in hits)} (a mixture of experts is not supported)")
    _path, mod, (_in, _out, transposed) = hits[0]
    by_id = {id(p): n for n, p in model.named_parameters()}
    name = by_id[id(mod.weight)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and mod.weight is emb.weight:  # never edit (tied) embeddings
        raise AnatomyError(f"{name} is tied to the embeddings; refusing to edit it")
    return EditSite(layer, mod, name, transposed)


def edit_sites(model: torch.nn.Module) -> list[EditSite]:
    """The edit site of every decoder layer, bottom to top."""
    return [edit_site(model, i) for i in range(n_layers(model))]


# --------------------------------------------------------------------------- stopping a forward early


class StopForward(Exception):
    """Raised from a hook once everything needed is captured: layers above are not run."""


@contextmanager
def stop_after(model: torch.nn.Module, layer: int, on_output: Callable[[Any], None] | None = None) -> Iterator[None]:
    """Inside this block, a forward pass raises `StopForward` as soon as decoder layer
    `layer` has run (after handing its output to `on_output`); the caller catches it:

        with stop_after(model, 7):
            try:
                model.base_model(input_ids=ids)
            except StopForward:
                pass
    """

    def hook(_m: torch.nn.Module, _inp: Any, out: Any) -> None:
        if on_output is not None:
            on_output(out)
        raise StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
