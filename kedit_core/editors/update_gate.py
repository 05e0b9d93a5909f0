"""The update gate: a MEMIT/AlphaEdit update acts only where it is large.

(Not the regression gate of `kedit_core.regression_gate`, which accepts or rejects whole batches.)

Why. MEMIT writes each fact as an update of the MLP output projections of layers 3-7, fitted
at the subject's last token. Every other token's key has a small component along the
edited key directions, so it picks up a small piece of the update. Over a stream these
leaks add up (docs/editing.md, fourth round: ~0.047 of locality per batch of 10, growing
like the square root of the number of batches) and flip answers the model holds by a
small margin. No constraint on the update itself removed them without removing the edits:
every setting traded locality against paraphrase along one line.

What. The leak and the edit differ in size: at an edited subject the update's output is
its share of the target residual (norm ~5-70 per layer here), on ordinary text it is
small. So each edited layer computes

    out(k) = W_base k + [ ||dW k|| > tau ] * dW k,      dW = W_live - W_base

per token position, with `tau` the `quantile` of ||dW k|| over the key positions of
ordinary text (the key-statistics corpus): the summed update passes where it is larger
than on that share of ordinary text, and ordinary text sees the unedited layer. tau is
recomputed whenever the layer's weights change (an edit, a rollback, a version rebuild),
so it is a function of the weights alone, and the ledger's deltas stay plain weight
deltas: applying, reverting and rebuilding versions are unchanged and exact.
The idea of routing an edit by how strongly an input activates it is the field's (WISE,
GRACE, T-Patcher route or threshold on activations); this form of it, a threshold on the
closed-form update's own output, is kedit's, chosen by measurement (docs/editing.md,
"The update gate").

Per-batch mode (`update_gate.per_batch`, AlphaEdit's default; `_Segments`; docs/editing.md
"Each batch gated on its own", eleventh and thirteenth rounds): each applied change of a
layer is gated on its own with the tau it got when applied, all taus scaled by one common
factor so that the changes together pass on no more ordinary text than the quantile allows
(`_Segments.union_scale`); the gate is then a function of the version chain (each link's
delta), not of the summed weights alone, and a rebuilt version gets its links through
`UpdateGate.load_links`.

Where the base weights come from: the model's own weight files (read tensor by tensor;
exact, whatever version is live), or for in-memory test models a snapshot taken when
they were built (`LoadedModel.base_tensor`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kedit_core.anatomy import edit_site
from kedit_core.keystats import chat_keys, generic_keys
from kedit_core.model import LoadedModel
from kedit_core.routing import GATE_ATTR, ROUTE, installed_update_gate

log = logging.getLogger(__name__)



@dataclass
class _LayerGate:
    layer: int
    module: torch.nn.Module
    transposed: bool  # GPT-2 Conv1D: weight is [in, out]
    base: torch.Tensor  # W_base, same layout as the weight
    keys: torch.Tensor  # [n, inter] keys of ordinary text at this layer
    quantile: float
    served_keys: torch.Tensor | None = None  # [m, inter] keys of served chats (keystats.chat_keys)
    served_quantile: float = 1.0  # tau >= this quantile of the update's size on them (1.0: their max)
    version: tuple[int, int] | None = None  # (data_ptr, _version) of the weight when tau was computed
    delta: torch.Tensor | None = None  # dW in [out, in] layout, None when the layer is at base
    tau: float = 0.0
    passed: int = 0  # token positions where the update passed (diagnostics)
    seen: int = 0
    per_batch: bool = False  # gate each applied change on its own (see _Segments)
    union: bool = True  # per-batch: bound where any change passes on ordinary text (`_Segments.union_scale`)
    segments: _Segments | None = None
    param_name: str = ""  # the weight's name in the model (what a stored delta calls it)

    def refresh(self) -> None:
        w = self.module.weight
        if w.dtype != self.base.dtype:
            # A lower-precision stand-in for these weights (memit_speedups.weights_in holds a
            # float32 model in bfloat16 while targets are optimised): the same weights rounded.
            # Keep the gate the float32 weights gave. Read off the stand-in, the rounding was
            # a full-rank change: the per-batch gate factored and gated it as a new batch
            # (a full SVD, and a union scale over R + 576 directions, on every layer) and took
            # it out again when the float32 weights came back, twice per batch for nothing.
            return
        # `_version` counts in-place changes of the tensor (apply/revert/copy_ are in place),
        # `data_ptr` catches a replaced tensor: together a cheap "did the weights change?"
        stamp = (w.data_ptr(), w._version)
        if stamp == self.version:
            return
        with torch.no_grad():
            d = w.detach() - self.base
            if not torch.any(d):
                self.delta, self.tau = None, 0.0
                self.segments = None
            else:
                self.delta = (d.T if self.transposed else d).contiguous()  # [out, in]
                if self.per_batch:
                    if self.segments is None:
                        self.segments = _Segments()
                    # float32 W + dW rounds each entry by <= half an ulp of W: ~1e-7 |W|
                    self.segments.account(self.delta, self.threshold, rounding=1e-6 * float(w.detach().norm()))
                    if self.union and self.segments.taus:
                        self.segments.scale = self.segments.union_scale(self)
                    self.tau = self.segments.taus[-1] if self.segments.taus else 0.0
                else:
                    self.tau = self.threshold(self.delta)
        self.version = stamp

    def factor_link(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """One stored delta's change of this layer as (U*S, V, tau), or None if it has none."""
        if self.param_name not in tensors:
            return None
        change = tensors[self.param_name].to(self.base.device, self.base.dtype)
        change = (change.T if self.transposed else change).contiguous()
        u, v = _low_rank(change)
        return u, v, self.threshold(change)

    def threshold(self, delta: torch.Tensor) -> float:
        """tau for an update `delta` ([out, in]): its `quantile` on ordinary text, and never
        below what ordinary served chats hold (every request has the template)."""
        dt = _at_least_float32(delta.dtype)  # a half-precision model's tau is measured in float32
        delta = delta.to(dt)
        norms = (self.keys.to(dt) @ delta.T).norm(dim=-1)
        tau = float(torch.quantile(norms.float(), self.quantile))
        if self.served_keys is not None and self.served_keys.numel():
            served = (self.served_keys.to(dt) @ delta.T).norm(dim=-1).float()
            tau = max(tau, float(served.max() if self.served_quantile >= 1.0
                                 else torch.quantile(served, self.served_quantile)))
        return tau

    def hook(self, _module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        self.refresh()
        if self.delta is None:
            return out
        k = args[0]
        if ROUTE.get() == "out":
            return out - k @ self.delta.to(k.dtype).T  # the base layer's output
        if self.segments is not None and self.segments.taus:
            return out - self.segments.blocked(k, self)
        d = k @ self.delta.to(k.dtype).T  # the update's share of this output
        small = (d.detach().norm(dim=-1, keepdim=True) <= self.tau)
        self.passed += int((~small).sum())
        self.seen += small.numel()
        # W_live k - dW k: the base layer's output to float rounding, without a second matmul
        return out - d * small.to(d.dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision weight (bfloat16, float16), else the weight's own type."""
    return torch.promote_types(dtype, torch.float32)


def _low_rank(change: torch.Tensor, rel: float = 1e-6, sketch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`change` [out, in] as U*S [out, r] times V [r, in] (V's rows orthonormal), keeping the
    singular values above `rel` of the largest, in float64.

    A batch's change has rank ~10-20, so a fixed-seed randomized range finder of `sketch`
    columns (Halko et al. 2011) captures it exactly: ~9x cheaper than a full SVD of a
    576 x 1536 layer here (14 ms against 125 ms, alone on the cores), which matters when a
    rebuilt version factors every link of its chain. Where the sketch misses more than `rel`
    of the change (rank above it), the full SVD is taken. (The sketch's own generator, not
    torch's global one, so serving and sampling see the same random stream as without it.)"""
    c = change.double()
    if min(c.shape) > 2 * sketch:
        gen = torch.Generator(device=c.device).manual_seed(0)
        omega = torch.randn(c.shape[1], sketch, dtype=c.dtype, device=c.device, generator=gen)
        q, _ = torch.linalg.qr(c @ omega)  # [out, sketch]: the change's column space
        small = q.T @ c
        if float((c - q @ small).norm()) <= rel * float(c.norm()):
            u_s, v = _factors(small, rel)
            return (q @ u_s).to(change.dtype), v.to(change.dtype).contiguous()
    u_s, v = _factors(c, rel)
    return u_s.to(change.dtype), v.to(change.dtype).contiguous()


def _factors(c: torch.Tensor, rel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c as U*S times V from its SVD, singular values above `rel` of the largest."""
    u, s, v = torch.linalg.svd(c, full_matrices=False)
    keep = s > s[0] * rel
    return u[:, keep] * s[keep], v[keep]


class _Segments:
    """The applied changes of one layer's weights, each gated on its own (per-batch mode).

    Why. With one gate over the summed update, tau (a quantile of the sum's size on
    ordinary text) grows with every batch while each edit's own share at its subject does
    not, so over a long stream the gate blocks the early edits (docs/editing.md, "A thousand
    edits": first batch 0.73 ungated vs 0.35 gated after 250 edits). Here each change of the
    weights (one batch's update at this layer) keeps the tau it had when it was applied, and
    passes only where it is itself large: out = W_base k + sum_b [||dW_b k|| > tau_b] dW_b k.

    A change is stored as low-rank factors (a batch of n facts updates a layer with rank at
    most its number of key rows: 10-20 for 10 facts here), keeping singular values above
    1e-6 of the largest (float32 rounding of W + dW sits far below; `_low_rank`).
    A change that undoes the last ones (a rollback) removes them.
    """

    def __init__(self) -> None:
        # Every change's factors side by side, held once: the hook reads them stacked, and a
        # per-change list beside a stacked copy held each factor twice (at 998 edits 70 MB
        # of factors and 70 MB of stack on the five layers; `us`/`vs` are views into these).
        self.u_all: torch.Tensor | None = None  # [out, R]: U_b * S_b of each change, in order
        self.v_all: torch.Tensor | None = None  # [R, in]: V_b of each change (orthonormal rows)
        self.ranks: list[int] = []  # r_b: how many of the R directions each change has
        self.taus: list[float] = []
        self.scale = 1.0  # every tau times this (`union_scale`); 1.0: each change on its own share
        self.total: torch.Tensor | None = None  # the summed update accounted for, [out, in]
        self._stack: tuple[torch.Tensor, ...] | None = None
        # union_scale's per-position worst ratio over the first n changes, per key set:
        # name -> (n, [P] float64). Changes are only appended or removed from the end, and a
        # change's ratios never move, so a new change costs its own ranks, not all R.
        self._worst: dict[str, tuple[int, torch.Tensor]] = {}
        self.generation = 0  # counts every change of the changes held (added or removed)
        # (the chain's link keys, generation) when `UpdateGate.load_links` left these changes:
        # a later load whose chain extends it adds only the new links, unless they changed since
        self.loaded: tuple[list[str], int] | None = None

    @property
    def us(self) -> list[torch.Tensor]:
        """Each change's U*S [out, r_b] (views into `u_all`)."""
        return list(torch.split(self.u_all, self.ranks, dim=1)) if self.ranks else []

    @property
    def vs(self) -> list[torch.Tensor]:
        """Each change's V [r_b, in] (views into `v_all`)."""
        return list(torch.split(self.v_all, self.ranks, dim=0)) if self.ranks else []

    def account(self, delta: torch.Tensor, threshold: Callable[[torch.Tensor], float], rounding: float) -> None:
        """Take the weights' summed update `delta` [out, in]: a new change, a rollback of the
        last ones, or (a change smaller than `rounding`, the float32 rounding of adding the
        links to the weights) nothing new."""
        change = delta - self.total if self.total is not None else delta
        scale = float(change.norm())
        self.total = delta.clone()  # what the weights hold, whichever way this goes
        if scale <= rounding:
            return
        undone = torch.zeros_like(change)
        us, vs = self.us, self.vs
        for n in range(1, len(us) + 1):  # a rollback of the last n changes?
            u, v = us[-n], vs[-n]
            # <change, U_n V_n> = trace(U_n^T change V_n^T): a rollback of change n gives
            # -||U_n V_n||^2, a new batch ~0; stop at the first change not being undone
            # (cheap: r x r, no dense rebuild of every earlier change per batch)
            if float(torch.trace(u.T @ change @ v.T)) > -0.5 * float(u.norm()) ** 2:
                break
            undone -= u @ v
            if float((change - undone).norm()) <= 1e-3 * scale:
                self._drop_last(n)
                return
        self.push(change, threshold)
        self.total = delta.clone()

    def push(self, change: torch.Tensor, threshold: Callable[[torch.Tensor], float]) -> None:
        """Add one applied change ([out, in]) with the tau it has now."""
        self.add(*_low_rank(change), threshold(change))

    def add(self, u: torch.Tensor, v: torch.Tensor, tau: float) -> None:
        """Add one change given as factors (U*S [out, r], V [r, in]) and its tau."""
        self.extend([(u, v, tau)])

    def extend(self, parts: list[tuple[torch.Tensor, torch.Tensor, float]],
               total: torch.Tensor | None = None) -> None:
        """Add changes given as (U*S, V, tau), in order, with one copy of the stack: appending
        copies every factor held (R x (in + out) floats, ~0.1 s a layer at 10,000 edits), the
        price of holding each once; a rebuilt chain is added in one go, not one copy a link.
        `total`: the summed update the changes make, when known (a restored state saved it),
        instead of summing the factors."""
        if not parts:
            self.total = total if total is not None else self.total
            return
        start = sum(self.ranks)
        held = [] if self.u_all is None else [self.u_all]
        self.u_all = torch.cat(held + [u for u, _, _ in parts], dim=1)
        held = [] if self.v_all is None else [self.v_all]
        self.v_all = torch.cat(held + [v for _, v, _ in parts], dim=0)
        self.ranks += [v.shape[0] for _, v, _ in parts]
        self.taus += [tau for _, _, tau in parts]
        self.generation += 1
        if total is not None:
            self.total = total
        else:
            added = self.u_all[:, start:] @ self.v_all[start:]
            self.total = added if self.total is None else self.total + added
        self._stack = None

    def _drop_last(self, n: int) -> None:
        """Remove the last n changes (a rollback); the kept factors are copied out, so the
        dropped ones' memory goes with them. Both caches derived from the changes go too: the
        stack, and union_scale's worst ratios (rare: recomputed whole on the next call)."""
        keep = sum(self.ranks[:-n])
        self._worst = {}
        self.generation += 1
        del self.ranks[-n:], self.taus[-n:]
        if self.ranks:
            self.u_all, self.v_all = self.u_all[:, :keep].clone(), self.v_all[:keep].clone()
        else:
            self.u_all = self.v_all = None
        self._stack = None

    def state(self) -> dict[str, Any]:
        return {"us": self.us, "vs": self.vs, "taus": self.taus, "total": self.total}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Segments:
        seg = cls()
        # the summed update as the weights held it (the factors' sum to rounding)
        seg.extend(list(zip(state["us"], state["vs"], state["taus"])), total=state["total"])
        return seg

    def _stacked(self) -> tuple[torch.Tensor, ...]:
        """Every change's factors side by side (cached): see `_stack_of`."""
        if self._stack is None:
            self._stack = self._stack_of(0)
        return self._stack

    def _stack_of(self, first: int) -> tuple[torch.Tensor, ...]:
        """The factors of changes first.. side by side: V [R, in] (orthonormal rows), U*S
        [out, R], S [R], which of these changes each of the R directions belongs to [R], and
        their taus."""
        start = sum(self.ranks[:first])
        v_all, u_all = self.v_all[start:], self.u_all[:, start:]  # views: no copy of the factors
        dev = v_all.device
        owner = torch.repeat_interleave(torch.arange(len(self.ranks) - first, device=dev),
                                        torch.tensor(self.ranks[first:], device=dev))
        return v_all, u_all, u_all.norm(dim=0), owner, torch.tensor(self.taus[first:], device=dev)

    @staticmethod
    def _sizes2(z: torch.Tensor, stack: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Each change's squared output size at each position, [N, B], from the positions'
        coordinates on the changes' directions `z` ([..., R], k @ V^T): ||S_b (V_b k)||^2,
        in float32 (U_b is orthonormal, so no output of the layer's width is formed)."""
        _v, _u, s_all, owner, taus = stack
        flat = (z.detach().float() * s_all).reshape(-1, z.shape[-1]) ** 2
        return torch.zeros(flat.shape[0], len(taus), device=z.device).index_add_(1, owner, flat)

    def _worst_ratio(self, name: str, keys: torch.Tensor) -> torch.Tensor:
        """Per position of `keys`, max over all changes of ||dW_b k|| / tau_b ([P], float64),
        computing only the changes added since the last call for this key set."""
        done, worst = self._worst.get(name, (0, None))
        if done < len(self.taus):
            stack = self._stack_of(done)
            size2 = self._sizes2(keys.to(stack[0].dtype) @ stack[0].T, stack)  # [P, new changes]
            new = (size2 / stack[4].float() ** 2).max(dim=1).values.sqrt().double()
            worst = new if worst is None else torch.maximum(worst, new)
            self._worst[name] = (len(self.taus), worst)
        return worst

    def union_scale(self, gate: _LayerGate) -> float:
        """The factor s >= 1 on every tau that keeps the share of ordinary positions where
        *any* change passes at the gate's quantile (and on served chats at theirs).

        Why. Each change alone passes on 0.1% of ordinary positions, but not the same 0.1%:
        B changes passed on up to B times as many, and teacher-forced locality fell with the
        number of batches (0.98 -> 0.87 over 1,000 edits, docs/editing.md, eleventh round).
        The summed gate kept the union at 0.1% by raising one tau on the sum, which grows
        with every batch; here the bar is each change's own tau, raised together only as
        far as the *largest* ratio size/tau over the changes needs: it grows with the
        number of changes like an extreme value, not like the sum. Recomputed whenever the
        changes change (a function of the chain, as each tau is); each change's ratios are
        computed once (`_worst_ratio`), so a batch costs its own ranks, not the stream's:
        done whole on every refresh it took 1.2 s per layer at 1,000 edits (R ~1,900), a
        third of a batch's time there (docs/editing.md, fourteenth round)."""
        def share_bar(name: str, keys: torch.Tensor, q: float) -> float:
            worst = self._worst_ratio(name, keys)
            return float(worst.max() if q >= 1.0 else torch.quantile(worst, q))

        scale = share_bar("ordinary", gate.keys, gate.quantile)
        if gate.served_keys is not None and gate.served_keys.numel():
            scale = max(scale, share_bar("served", gate.served_keys, gate.served_quantile))
        return max(1.0, scale)

    def blocked(self, k: torch.Tensor, gate: _LayerGate) -> torch.Tensor:
        """The summed output of the changes that do not pass at each position of `k`.

        A change's output is U_b S_b (V_b k) with U_b orthonormal, so its size is
        ||S_b (V_b k)||: computed in the R-dimensional space of the factors, never as B
        outputs of the layer's width (cost per token ~ R * (in + out), R = the changes' ranks)."""
        stack = self._stacked()
        v_all, u_all, _s, owner, taus = stack
        dt = k.dtype
        z = k @ v_all.to(dt).T  # [..., R]
        small = self._sizes2(z, stack) <= (self.scale * taus.float()) ** 2  # [N, B]
        gate.passed += int((~small).sum())
        gate.seen += small.numel()
        keep = small[:, owner].reshape(z.shape).to(dt)  # [..., R]: directions of the blocked changes
        return (z * keep) @ u_all.to(dt).T


@dataclass
class UpdateGate:
    """Installed forward hooks on the edited layers' output projections (one per layer)."""

    quantile: float
    layers: list[int]
    source: tuple[Any, ...] = ()  # (corpus, positions, samples): the ordinary text tau comes from
    gates: list[_LayerGate] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    scope: Any = None  # edit_scope.EditScope of the editor that installed it; None: no routing
    link_cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = field(default_factory=dict)

    def in_scope(self, questions: list[str]) -> list[bool | None]:
        """Per question, how it is routed (None for all when the gate has no scope)."""
        return list(self.scope.in_scope(questions)) if self.scope is not None else [None] * len(questions)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def refresh(self) -> None:
        """Recompute tau now for weights that changed (a server does this before a version
        goes live, so concurrent requests never find it half-updated)."""
        for g in self.gates:
            g.refresh()

    @property
    def per_batch(self) -> bool:
        return any(g.per_batch for g in self.gates)

    def load_links(self, links: list[tuple[str, Callable[[], dict[str, torch.Tensor]]]]) -> None:
        """Per-batch gates: take each applied change from the version chain's deltas rather
        than from what this process saw applied, for a model rebuilt at a version. `links`
        in chain order, each (a key unique to the stored delta, a function reading its
        {parameter name: W_new - W_old}); a link seen before is not read again (its factors
        and taus are kept on the gate: a server moving along its chain factors each link
        once). The weights must already be base + those links.

        A server moves forward one night at a time: when the gate already holds a prefix of
        the chain (loaded here, nothing applied or rolled back since), only the new links are
        added, so the union scale's per-change ratios are computed for them alone (done
        whole, ~1.2 s a layer at 1,000 edits and ten times that at 10,000). Each link's
        factors are held once: the cached factors of the links in use are views into the
        gate's stack, not a second copy of it."""
        if not self.per_batch:
            return
        for key, read in links:
            if key not in self.link_cache:
                tensors = read()
                with torch.no_grad():
                    self.link_cache[key] = {g.layer: g.factor_link(tensors) for g in self.gates if g.per_batch}
        keys = [key for key, _ in links]
        for g in self.gates:
            if not g.per_batch:
                continue
            held = g.segments.loaded if g.segments is not None else None
            if held is not None and g.segments.generation == held[1] and keys[:len(held[0])] == held[0]:
                new_keys = keys[len(held[0]):]  # the gate holds this chain's first links as loaded
            else:
                g.version, g.segments, new_keys = None, _Segments(), keys
            parts = [self.link_cache[key].get(g.layer) for key in new_keys]
            g.segments.extend([part for part in parts if part is not None])
            g.refresh()  # the summed update now; float rounding of the sum is not a new change
            on_chain = sum(self.link_cache[key].get(g.layer) is not None for key in keys)
            if g.segments is not None:  # (None: the chain leaves the layer at base)
                exact = len(g.segments.taus) == on_chain  # else the weights hold more: rebuild next time
                if exact:
                    self._share_factors(g, keys)
                g.segments.loaded = (keys, g.segments.generation) if exact else None

    def _share_factors(self, g: _LayerGate, chain: list[str]) -> None:
        """Point the cached factors of `chain`'s links at layer `g` to views of its stack, and
        give cached links off the chain their own copy (a view would keep a whole old stack)."""
        held = iter(zip(g.segments.us, g.segments.vs))  # the chain's changes, in chain order
        for key in chain:
            part = self.link_cache[key].get(g.layer)
            if part is not None:
                u, v = next(held)
                self.link_cache[key][g.layer] = (u, v, part[2])
        on_chain = set(chain)
        for key, per_layer in self.link_cache.items():
            part = per_layer.get(g.layer)
            if key not in on_chain and part is not None and part[0]._base is not None:
                per_layer[g.layer] = (part[0].clone(), part[1].clone(), part[2])

    def segments_state(self) -> dict[int, dict[str, Any]]:
        """Per layer, the changes a per-batch gate holds (to save with the weights: they
        cannot be recovered from the summed weights alone)."""
        self.refresh()
        return {g.layer: g.segments.state() for g in self.gates if g.segments is not None}

    def load_segments_state(self, state: dict[int, dict[str, Any]]) -> None:
        """Restore `segments_state()` over weights that equal what they were when it was taken."""
        for g in self.gates:
            g.version = None
            if g.layer in state:
                g.segments = _Segments.from_state(state[g.layer])
            g.refresh()

    def stats(self) -> dict[str, Any]:
        self.refresh()
        return {
            f"L{g.layer}": {"tau": float(f"{g.tau:.4g}"), "passed_share": round(g.passed / g.seen, 5) if g.seen else None,
                            **({"changes": len(g.segments.taus), "union_scale": round(g.segments.scale, 4)}
                               if g.segments is not None else {})}
            for g in self.gates
        }


def remove_update_gate(lm: LoadedModel) -> None:
    gate = installed_update_gate(lm)
    if gate is not None:
        gate.remove()
        delattr(lm.model, GATE_ATTR)


def serve_as(lm: LoadedModel, attach: Callable[[LoadedModel], None] | None) -> None:
    """Prepare `lm` the way a version's weight editor serves it (`attach`, its
    `Editor.attach`), or with no gate when no weight editor made it; tau is computed now,
    before anything reads the model (a server's requests run concurrently)."""
    if attach is not None:
        attach(lm)
    else:
        remove_update_gate(lm)
    gate = installed_update_gate(lm)
    if gate is not None:
        gate.refresh()


def install_update_gate(
    lm: LoadedModel,
    layers: list[int],
    quantile: float,
    corpus: str | None = None,
    positions: int = 4096,
    samples: int = 20000,
    served_chats: int = 192,
    served_quantile: float = 0.999,
    per_batch: bool = False,
    union: bool = True,
) -> UpdateGate:
    """Gate the updates of `layers` (idempotent: the same gate is kept, another replaced).
    With `served_chats` > 0 (and a chat template), tau is never below the `served_quantile`
    (1.0: the largest) of the update's size on ordinary served chats (`keystats.chat_keys`: the model's own questions and replies in
    its chat template), so unrelated questions users ask see the unedited layers."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"gate quantile must be between 0 and 1, got {quantile}")
    dtype = lm.dtype
    # Each batch's change is read off the weights, and a half-precision W + dW rounds by up
    # to half an ulp of W per entry: on a bfloat16 model that is as large as a batch's whole
    # update (on a tiny Llama one batch's update lost a quarter of its norm to it), so
    # changes could not be told from rounding, nor a rebuilt gate's from the live one's.
    # There the summed update is gated (the same on every rebuild of that dtype).
    summed_instead = per_batch and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps
    per_batch = per_batch and not summed_instead
    source = (corpus, positions, samples, served_chats, served_quantile, per_batch, union)
    current = installed_update_gate(lm)
    if current is not None and (current.quantile, current.layers, current.source) == (quantile, sorted(layers), source):
        return current
    if summed_instead:
        log.warning("update_gate.per_batch needs float32 weights; this model is %s, so its summed update is gated "
                    "(load it with --dtype float32 to gate each batch on its own)", str(dtype).removeprefix("torch."))
    remove_update_gate(lm)
    keys = generic_keys(lm, layers, corpus=corpus, positions=positions, samples=samples)
    served = chat_keys(lm, layers, served_chats) if served_chats and getattr(lm.tokenizer, "chat_template", None) else {}
    gate = UpdateGate(quantile=quantile, layers=sorted(layers), source=source)
    for layer in gate.layers:
        site = edit_site(lm.model, layer)
        base = lm.base_tensor(site.param_name).to(site.module.weight.device, site.module.weight.dtype)
        g = _LayerGate(layer, site.module, site.transposed, base, keys[layer].to(base.device), quantile,
                       served[layer].to(base.device) if layer in served else None, served_quantile,
                       per_batch=per_batch, union=union, param_name=site.param_name)
        gate.gates.append(g)
        gate.handles.append(site.module.register_forward_hook(g.hook))
    setattr(lm.model, GATE_ATTR, gate)
    log.info("update gate on layers %s at quantile %s", gate.layers, quantile)
    return gate
