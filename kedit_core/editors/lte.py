"""LTE, Learning to Edit (Jiang et al., 2024): teach the model once to *use* updated
knowledge shown in its prompt, then edit by retrieval.

Alignment phase (once per base model and data): LoRA fine-tuning on parallel data in one
format,

    [Updated Information] {fact(s)}
    [Question] {question}  ->  answer

with three kinds of example: in-scope (the question, or a paraphrase, asks about the
shown fact: answer with the new answer, also when distractor facts are mixed in),
out-of-scope (an unrelated question under an irrelevant fact: answer exactly as the base
model does without it) and plain questions (no block at all: base answer, so the aligned
weights keep the base behaviour where retrieval shows nothing). The adapter is merged
into the weights (as a `WeightDelta`, applied with the first edited batch and recorded
like any delta) and cached under kedit_home()/lte keyed by the base fingerprint and the
hash of the data and settings.

Alignment data come ONLY from the training part of the development slice (zsRE records
from index `alignment_start` on; evaluation streams take the first records) and the
project's own edit cases. `build_alignment_examples` drops every training case that
shares an id, a subject or a question with the evaluation cases, and checks the result;
at edit time every edited case is checked again against the alignment data, so a leak is
an error, never a silent success.

Inference phase: `edit` puts the facts into an edit memory (memory.py) and
`rewrite_prompt` prepends the top retrieved facts above a similarity threshold in the
same format. Weights do not change after alignment.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from kedit_core.atomic import atomic_write_text
from kedit_core.benchmark_records import BenchmarkFormatError, zsre_record_to_case
from kedit_core.editors.base import EditorConfig, EditResult, register
from kedit_core.editors.finetune import train_lora_delta
from kedit_core.editors.rag import RAGConfig, RAGEditor
from kedit_core.errors import KeditError
from kedit_core.home import kedit_home
from kedit_core.memory import render_fact
from kedit_core.model import LoadedModel
from kedit_core.scoring import normalise_answer
from kedit_core.types import EditCase
from kedit_core.weights import WeightDelta

log = logging.getLogger(__name__)

DEV_SLICE = Path(__file__).resolve().parents[2] / "data" / "benchmarks" / "zsre_mend_train_1k.json"


class AlignmentLeakError(KeditError):
    """An evaluation case appears in LTE's alignment data."""


@dataclass
class LTEConfig(RAGConfig):
    method: ClassVar[str] = "lte"
    k: int = 2
    threshold: float | None = 0.65
    template: str = "[Updated Information] {facts}\n[Question] {question}"
    memory_name: str = "lte"
    # alignment data
    alignment_data: str = str(DEV_SLICE)  # zsRE (MEND format) development slice
    alignment_start: int = 500  # records [alignment_start:] train; [:alignment_start] are reserved for evaluation
    max_alignment_records: int | None = 500
    own_cases_path: str | None = None  # JSONL of EditCase: the project's own cases to align on too
    max_distractors: int = 2  # extra irrelevant facts mixed into in-scope examples
    plain_share: float = 0.3  # share of records that also give a plain (no block) example
    base_answer_tokens: int = 8
    # alignment training (LoRA, merged)
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "down_proj"])
    lr: float = 1e-3
    steps: int = 300
    batch_size: int = 8
    max_seconds: float | None = 600.0  # bound on the CPU alignment run


@dataclass
class AlignExample:
    kind: str  # in_scope | out_scope | plain
    facts: list[str]
    question: str
    answer: str | None  # None: the base model's own answer (filled in before training)
    source_case: str | None = None


# --------------------------------------------------------------------------- leak guard


def _norm(text: str) -> str:
    return normalise_answer(text or "")


def case_texts(case: EditCase) -> set[str]:
    """Every question a case is edited or evaluated with, normalised."""
    return ({_norm(case.prompt), _norm(case.question or "")} | {_norm(p.prompt) for p in case.probes}) - {""}


def eval_signature(cases: Iterable[EditCase]) -> dict[str, set[str]]:
    cases = list(cases)
    return {
        "ids": {c.case_id for c in cases},
        "subjects": {_norm(c.subject) for c in cases},
        "texts": set().union(*(case_texts(c) for c in cases)) if cases else set(),
    }


def examples_signature(examples: Sequence[AlignExample], cases: Sequence[EditCase]) -> dict[str, set[str]]:
    """What the aligned adapter has seen: the cases its examples came from (ids, subjects)
    and the questions it was shown. Not every text of those cases: a training case's
    locality question that is also an evaluation question is left out of the examples
    (zsRE reuses NQ questions), so it must not make that evaluation case "seen"."""
    ids = {ex.source_case for ex in examples}
    return {
        "ids": ids,
        "subjects": {_norm(c.subject) for c in cases if c.case_id in ids},
        "texts": {_norm(ex.question) for ex in examples} - {""},
    }


def _leading_question(text: str, texts: set[str]) -> str | None:
    """The evaluation question `text` starts with, if any (a fact is "question answer.")."""
    words = _norm(text).split()
    for n in range(1, len(words) + 1):
        head = " ".join(words[:n])
        if head in texts:
            return head
    return None


def leaks(case: EditCase, signature: dict[str, set[str]]) -> str | None:
    """Why `case` overlaps the cases behind `signature`, or None."""
    if case.case_id in signature["ids"]:
        return f"case id {case.case_id}"
    if _norm(case.subject) in signature["subjects"]:
        return f"subject {case.subject!r}"
    for text in sorted(case_texts(case)):
        hit = _leading_question(text, signature["texts"])
        if hit:
            return f"question {hit!r}"
    return None


def _read_alignment_cache(folder: Path) -> tuple[WeightDelta, dict[str, Any]] | None:
    """The cached aligned adapter and its info, or None when there is none or it is unusable
    (a truncated alignment.json, a delta that fails its sha256): then it is rebuilt, with a
    warning, instead of failing every later run on the same broken cache."""
    info_path, delta_path = folder / "alignment.json", folder / "adapter_delta.safetensors"
    if not (info_path.exists() and delta_path.exists()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise ValueError("no sha256 recorded")
        delta = WeightDelta.load(delta_path, expected_sha256=info["sha256"])
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        log.warning("LTE: the alignment cache in %s is unusable (%s: %s); rebuilding it", folder,
                    type(exc).__name__, exc)
        for p in (info_path, delta_path):
            p.unlink(missing_ok=True)
        return None
    log.info("LTE: aligned adapter from cache %s (trained in %.0fs)", folder, info.get("train_seconds", 0.0))
    return delta, {**info, "cached": True, "path": str(folder)}


def alignment_split(path: str | Path, start: int, limit: int | None = None) -> tuple[list[EditCase], list[EditCase]]:
    """(training cases = records[start:], reserved evaluation cases = records[:start]).

    Records that do not parse (the slice has a few with an empty `alt`) are left out."""
    cases = []
    for i, rec in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))):
        try:
            cases.append(zsre_record_to_case(rec, i, str(path)))
        except (BenchmarkFormatError, ValueError, TypeError, KeyError, AttributeError):
            continue
    index = {c.case_id: int(c.case_id.rsplit("-", 1)[1]) for c in cases}
    train = [c for c in cases if index[c.case_id] >= start]
    reserved = [c for c in cases if index[c.case_id] < start]
    return (train[:limit] if limit is not None else train), reserved


def build_alignment_examples(
    train_cases: Sequence[EditCase],
    eval_cases: Sequence[EditCase],
    seed: int = 0,
    max_distractors: int = 2,
    plain_share: float = 0.3,
) -> list[AlignExample]:
    """The parallel data, from `train_cases` minus anything overlapping `eval_cases`.

    Guarantees (checked before returning): no example's fact or question is a question of
    an evaluation case, and no training case with an evaluation case's id or subject is used.
    """
    sig = eval_signature(eval_cases)
    kept = [c for c in train_cases if leaks(c, sig) is None]
    if len(kept) < len(train_cases):
        log.info("LTE alignment: dropped %d training cases overlapping the evaluation cases", len(train_cases) - len(kept))
    # out-of-scope questions must not be evaluation questions either (zsRE reuses some NQ questions)
    rng = random.Random(seed)
    facts = [render_fact(c) for c in kept]
    examples: list[AlignExample] = []

    def distractors(i: int) -> list[str]:
        n = rng.randint(0, max_distractors) if len(kept) > 1 else 0
        pool = [j for j in rng.sample(range(len(kept)), min(len(kept), n + 1)) if j != i][:n]
        return [facts[j] for j in pool]

    for i, c in enumerate(kept):
        for q in [c.prompt] + [p.prompt for p in c.probes_of("paraphrase")]:
            shown = [facts[i]] + distractors(i)
            rng.shuffle(shown)
            examples.append(AlignExample("in_scope", shown, q, c.target_new, c.case_id))
        unrelated = [p.prompt for p in c.probes if p.kind.startswith("locality")]
        if len(kept) > 1:
            other = kept[(i + 1 + rng.randrange(len(kept) - 1)) % len(kept)]
            unrelated.append(other.prompt)
        for q in unrelated:
            if _leading_question(q, sig["texts"]):
                continue
            examples.append(AlignExample("out_scope", [facts[i]] + distractors(i)[:1], q, None, c.case_id))
            if rng.random() < plain_share:
                examples.append(AlignExample("plain", [], q, None, c.case_id))
    assert_no_leak(examples, eval_cases)
    rng.shuffle(examples)
    return examples


def assert_no_leak(examples: Sequence[AlignExample], eval_cases: Sequence[EditCase]) -> None:
    """Raise AlignmentLeakError if any evaluation question or case appears in the examples."""
    sig = eval_signature(eval_cases)
    texts = sig["texts"]
    for ex in examples:
        if ex.source_case in sig["ids"]:
            raise AlignmentLeakError(f"alignment example built from evaluation case {ex.source_case}")
        for text in [ex.question, *ex.facts]:
            hit = _leading_question(text, texts)
            if hit:
                raise AlignmentLeakError(f"alignment text {text!r} contains evaluation question {hit!r}")


def read_cases_jsonl(path: str | Path) -> list[EditCase]:
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(EditCase.from_json(line))
            except (ValueError, TypeError, KeyError) as exc:
                raise KeditError(f"{path} line {i + 1}: not an EditCase: {exc}") from exc
    return out


# --------------------------------------------------------------------------- the editor


@register("lte")
class LTEEditor(RAGEditor):
    config_class = LTEConfig
    config: LTEConfig

    def __init__(self, config: LTEConfig | None = None, own_cases: Sequence[EditCase] = (),
                 eval_cases: Sequence[EditCase] = (), **kw: Any) -> None:
        super().__init__(config, **kw)
        self.own_cases = list(own_cases)
        self.extra_eval_cases = list(eval_cases)  # evaluation cases beyond the reserved records
        self.alignment_info: dict[str, Any] | None = None
        self._alignment_signature: dict[str, set[str]] | None = None
        # set by load_state_dict: the served weights already carry this alignment (the ledger replays it)
        self._restored_alignment: str | None = None

    def format_prompt(self, facts: list[str], question: str) -> str:
        return self.config.template.format(facts="\n".join(facts), question=question)

    def render(self, ex: AlignExample) -> str:
        return self.format_prompt(ex.facts, ex.question) if ex.facts else ex.question

    # ---------------------------------------------------------------- alignment

    def alignment_examples(self, config: LTEConfig | None = None) -> tuple[list[AlignExample], list[EditCase]]:
        cfg = config or self.config
        train, reserved = alignment_split(cfg.alignment_data, cfg.alignment_start, cfg.max_alignment_records)
        own = self.own_cases + (read_cases_jsonl(cfg.own_cases_path) if cfg.own_cases_path else [])
        eval_cases = reserved + self.extra_eval_cases
        examples = build_alignment_examples(train + own, eval_cases, cfg.seed, cfg.max_distractors, cfg.plain_share)
        return examples, [c for c in train + own if c.case_id in {ex.source_case for ex in examples}]

    def cache_key(self, lm: LoadedModel, examples: list[AlignExample], config: LTEConfig | None = None) -> str:
        cfg = config or self.config
        # max_seconds is part of the key: a time-bounded (shorter) alignment must never be
        # reused by a run that asked for a longer one
        settings = {k: v for k, v in asdict(cfg).items() if k not in ("k", "threshold", "memory_name")}
        h = hashlib.sha256()
        h.update(lm.fingerprint.encode())
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        h.update(json.dumps([asdict(e) for e in examples], sort_keys=True).encode())
        return h.hexdigest()[:24]

    def align(self, lm: LoadedModel, config: LTEConfig | None = None) -> tuple[WeightDelta, dict[str, Any]]:
        """The aligned adapter as a merged delta (from the cache, or trained now and cached),
        as `config` (default: the editor's own) sets it."""
        from kedit_core.answer import generate

        cfg = config or self.config
        examples, used_cases = self.alignment_examples(cfg)
        key = self.cache_key(lm, examples, cfg)
        folder = kedit_home() / "lte" / f"{lm.fingerprint[:16]}-{key}"
        self._alignment_signature = examples_signature(examples, used_cases)
        cached = _read_alignment_cache(folder)
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        # out-of-scope and plain examples: what the base model answers to the plain question
        need = sorted({ex.question for ex in examples if ex.answer is None})
        log.info("LTE alignment: %d examples; generating %d base answers", len(examples), len(need))
        base: dict[str, str] = {}
        for s in range(0, len(need), 32):
            outs = generate(lm, need[s : s + 32], max_new_tokens=cfg.base_answer_tokens)
            base.update({q: (o.split("\n")[0].strip() or ".") for q, o in zip(need[s : s + 32], outs)})
            log.info("LTE alignment: base answers %d/%d", min(s + 32, len(need)), len(need))
        gen_seconds = time.perf_counter() - t0
        prompts = [self.render(ex) for ex in examples]
        answers = [ex.answer if ex.answer is not None else base[ex.question] for ex in examples]
        delta, rep = train_lora_delta(
            lm, prompts, answers, cfg.rank, cfg.alpha, list(cfg.target_modules), None, cfg.steps, cfg.lr,
            cfg.batch_size, stop_loss=None, max_seconds=cfg.max_seconds, seed=cfg.seed, log_every=10, desc="LTE alignment",
        )
        delta.meta = {"method": "lte-alignment", "key": key, "base_fingerprint": lm.fingerprint}
        folder.mkdir(parents=True, exist_ok=True)
        sha = delta.save(folder / "adapter_delta.safetensors")
        counts = {k: sum(e.kind == k for e in examples) for k in ("in_scope", "out_scope", "plain")}
        info = {
            "key": key, "sha256": sha, "examples": counts, "steps": rep.steps, "stopped": rep.stopped,
            "train_seconds": rep.seconds, "base_answer_seconds": gen_seconds, "loss_curve": rep.losses,
            "alignment_cases": len(used_cases),
        }
        atomic_write_text(folder / "alignment.json", json.dumps(info, indent=1))  # written last: marks the cache complete
        log.info("LTE alignment: %d steps in %.0fs (%s), loss %.3f -> %.3f; cached at %s", rep.steps, rep.seconds,
                 rep.stopped, rep.losses[0], rep.losses[-1], folder)
        return delta, {**info, "cached": False, "path": str(folder)}

    def check_not_in_alignment(self, cases: Sequence[EditCase]) -> None:
        if self._alignment_signature is None:
            return
        for c in cases:
            why = leaks(c, self._alignment_signature)
            if why:
                raise AlignmentLeakError(
                    f"LTE: case {c.case_id} was part of the alignment data ({why}); evaluate on records before "
                    f"index {self.config.alignment_start} of the development slice, or on other data"
                )

    # ---------------------------------------------------------------- editing

    def edit(self, lm: LoadedModel, cases: list[EditCase], config: EditorConfig | None = None) -> EditResult:
        """Store the facts; the first batch on a model also carries the alignment, trained
        with this call's settings (`config`, default the editor's own)."""
        cfg: LTEConfig = self.call_config(config)  # type: ignore[assignment]
        t0 = time.perf_counter()
        delta, align_info = WeightDelta(), None
        aligned_key = lm.info.get("lte_aligned") or self._restored_alignment
        if aligned_key is None:
            delta, align_info = self.align(lm, cfg)
            self.check_not_in_alignment(cases)
            delta.apply(lm.model)
            lm.info["lte_aligned"] = align_info["key"]  # a second LTE editor on this model must not re-apply
            self.alignment_info = align_info
        else:
            if self._alignment_signature is None:
                self.align_signature_only(cfg)
            self.check_not_in_alignment(cases)
        result = super().edit(lm, cases, cfg)
        result.method = "lte"
        result.delta = delta  # non-empty only for the batch that carried the alignment
        result.seconds = time.perf_counter() - t0
        if align_info is not None:
            result.info["alignment"] = {k: v for k, v in align_info.items() if k != "loss_curve"}
            if result.diagnostics:
                result.diagnostics[0].loss_curve = align_info.get("loss_curve", [])
        return result

    def state_dict(self) -> dict[str, Any]:
        key = (self.alignment_info or {}).get("key") or self._restored_alignment
        return {**super().state_dict(), "aligned_key": key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restored_alignment = state.get("aligned_key")
        if self._restored_alignment is None:
            self.alignment_info = None

    def align_signature_only(self, config: LTEConfig | None = None) -> None:
        examples, used = self.alignment_examples(config)
        self._alignment_signature = examples_signature(examples, used)

    def rollback(self, lm: LoadedModel, result: EditResult) -> None:
        was_applied = result.applied
        super().rollback(lm, result)
        if was_applied and not result.delta.is_empty:  # this batch carried the alignment: undo it too
            result.delta.revert(lm.model)
            lm.info.pop("lte_aligned", None)
            self.alignment_info, self._restored_alignment = None, None
