"""The regression gate: pure decisions over a batch's metrics.

After a batch is edited in, its metrics (see `kedit_core.regression`) are compared with
the base model's and with absolute limits. Two ways to fail, handled differently:

- *harm*: a general-ability or locality metric broke a threshold -> reject (roll back);
  a stronger retry would only do more harm, so no retry;
- *did not take*: the batch's own efficacy is below `take_floor` and nothing was harmed
  -> retry once with stronger settings, then reject.

No I/O here: the pipeline (`flows/services/gated_batches.py`) measures, calls `decide`, and acts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Metrics where a larger value is worse; every other metric is "higher is better".
LOWER_IS_BETTER = frozenset({"ref_ppl"})


def _default_max_drop() -> dict[str, float]:
    # Relative to the base model: 0.10 = at most 10% worse than base. For lower-is-better
    # metrics (perplexity) this is the allowed relative rise.
    return {"known_facts_acc": 0.10, "known_facts_em": 0.15, "ref_ppl": 0.25, "fluency_ge": 0.15}


def _default_floors() -> dict[str, float]:
    # Absolute limits. `locality` is the batch's own locality probes vs the model just
    # before the batch; `suite_locality` is drift of earlier edits' probes vs the base.
    # `locality_same` (other facts of the edited subject) has its own, lower floor: on
    # SmolLM2-135M AlphaEdit keeps unrelated subjects at 1.0 but moves about half of the
    # answer tokens of the edited subject's other facts (measured on the demo day), the
    # field's known same-subject weakness; the floor catches worse than that, and the
    # report shows the value for every batch.
    # `served_locality` / `suite_served_locality`: the share of unrelated questions whose
    # chat reply is unchanged (before the batch / since the base model): what users see.
    return {"locality": 0.70, "suite_locality": 0.70, "locality_same": 0.40,
            "served_locality": 0.80, "suite_served_locality": 0.80}


@dataclass
class RegressionGateConfig:
    """Thresholds and schedule of the regression gate.

    floors: metric -> lowest acceptable value (higher-is-better metrics).
    ceilings: metric -> highest acceptable value (lower-is-better metrics, e.g. ref_ppl).
    max_drop: metric -> largest acceptable relative worsening vs the base model's value.
    take_floor: the batch's own `take_metric` below this means the edit did not take.
    full_check_every: run the full check after every N-th batch (1 = always).
    retry_stronger: retry a batch that did not take once with `EditorConfig.stronger()`.
    """

    floors: dict[str, float] = field(default_factory=_default_floors)
    ceilings: dict[str, float] = field(default_factory=dict)
    max_drop: dict[str, float] = field(default_factory=_default_max_drop)
    # Did the batch take? Judged on served answers (the batch's questions asked in chat, as
    # `kedit serve` answers): teacher-forced accuracy can read ~1.0 while users read the old fact.
    take_metric: str = "served_efficacy"
    take_floor: float = 0.5
    full_check_every: int = 5
    retry_stronger: bool = True
    max_attempts: int = 2

    def __post_init__(self) -> None:
        if self.full_check_every < 1:
            raise ValueError(f"full_check_every must be >= 1, got {self.full_check_every}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name, v in self.max_drop.items():
            if v < 0:
                raise ValueError(f"max_drop[{name!r}] must be >= 0 (a fraction of the base value), got {v}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegressionGateConfig:
        return cls(**d)


@dataclass
class RegressionDecision:
    accept: bool
    reasons: list[str] = field(default_factory=list)
    retry: bool = False

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None


def harm_reasons(metrics: dict[str, float], base_metrics: dict[str, float], config: RegressionGateConfig) -> list[str]:
    """Every broken general-ability / locality threshold, as a readable sentence."""
    reasons: list[str] = []
    checked = set(config.floors) | set(config.ceilings) | set(config.max_drop)
    for name in sorted(checked):
        if name not in metrics or name == config.take_metric:
            continue
        v = metrics[name]
        if v is None or not math.isfinite(v):
            reasons.append(f"{name} is {v} (not a finite number)")
            continue
        if name in config.floors and v < config.floors[name]:
            reasons.append(f"{name} {v:.3f} below floor {config.floors[name]:.3f}")
        if name in config.ceilings and v > config.ceilings[name]:
            reasons.append(f"{name} {v:.3f} above ceiling {config.ceilings[name]:.3f}")
        base = base_metrics.get(name)
        if name in config.max_drop and base is not None and math.isfinite(base) and base != 0:
            limit = config.max_drop[name]
            if name in LOWER_IS_BETTER:
                rise = (v - base) / abs(base)
                if rise > limit:
                    reasons.append(f"{name} {v:.3f} is {rise:.0%} above base {base:.3f} (max {limit:.0%})")
            else:
                drop = (base - v) / abs(base)
                if drop > limit:
                    reasons.append(f"{name} {v:.3f} is {drop:.0%} below base {base:.3f} (max {limit:.0%})")
    return reasons


def decide(
    metrics: dict[str, float], base_metrics: dict[str, float], config: RegressionGateConfig, attempt: int = 1
) -> RegressionDecision:
    """Accept, reject, or reject-and-retry one batch attempt (1-based `attempt`)."""
    reasons = harm_reasons(metrics, base_metrics, config)
    if reasons:
        return RegressionDecision(accept=False, reasons=reasons, retry=False)
    took = metrics.get(config.take_metric)
    if took is not None and (not math.isfinite(took) or took < config.take_floor):
        retry = config.retry_stronger and attempt < config.max_attempts
        why = f"edit did not take: {config.take_metric} {took:.3f} below {config.take_floor:.3f}"
        if retry:
            why += "; retrying with stronger settings"
        elif attempt > 1:
            why += f" after {attempt} attempts"
        return RegressionDecision(accept=False, reasons=[why], retry=retry)
    return RegressionDecision(accept=True)


def is_full_check(step: int, config: RegressionGateConfig) -> bool:
    """Whether the batch at 1-based `step` gets the full check."""
    return step % config.full_check_every == 0
