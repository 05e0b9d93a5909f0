"""Second-moment statistics of MLP keys, C = E[k k^T], computed locally (never downloaded).

MEMIT and AlphaEdit need to know which directions of an MLP's key space ordinary text
uses, so that an edit leaves those directions (the model's other knowledge) alone. A key
k is the input of the MLP's output projection (Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`)
at one token position; C is averaged over the token positions of a generic text corpus.

Where the text comes from:
- a UTF-8 text file given by path (paragraphs separated by blank lines; `#` lines skipped);
- by default, `kedit_core/data/keystats_corpus.txt` (generic prose written for kedit),
  topped up, when more token positions are asked for than it holds, with continuations
  the model itself samples from the opening of each paragraph (seeded, so the text is
  reproducible; cached on disk). Sampled text has the model's own key distribution, which
  is what "the knowledge we must not disturb" means operationally.

Sample count trades quality for time. C is [inter, inter] (1536 x 1536 on SmolLM2-135M),
so it needs several times `inter` positions before its small eigen-directions mean
anything: with fewer positions than `inter` C is singular (a tiny ridge keeps MEMIT's
solve defined) and AlphaEdit's "null space" is partly sampling noise, so edits protect
unrelated knowledge less well. Cost grows linearly: each position is one token through
the layers up to the deepest edited layer. The shipped corpus holds ~4,200 SmolLM2 tokens;
the default 20,000 positions top it up with ~16,000 tokens the model samples itself
(batched with a KV cache: ~75 s once per model on 2 idle cores, cached), then C over
20,000 positions takes ~10 s for layers 3-7, then milliseconds from the cache.

Measured on SmolLM2-135M (docs/editing.md, 100 sequential zsRE edits): with 4,000
positions, the directions below 1% of the largest eigenvalue hold 14% of the corpus's own
key energy but 49% of the key energy of unseen questions (the small eigenvalues are
underestimated when positions are only 2.6x the dimension), so the "null space" did not
protect them: locality 0.79. With 20,000 positions that share fell to 13-34% and locality
rose to 0.84 at the same threshold. Fewer positions are fine for tests and tiny models.

Results are cached under `kedit_home()/keystats/`, one safetensors file per layer, keyed
by model fingerprint, layer, corpus hash and sample count.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kedit_core.anatomy import StopForward, edit_site, stop_after
from kedit_core.answer import answer_many, chat_prompt
from kedit_core.atomic import atomic_target, atomic_write_text
from kedit_core.device import autocast_bf16
from kedit_core.errors import KeditError
from kedit_core.home import kedit_home
from kedit_core.model import LoadedModel, kv_cache_kwargs, kv_cache_of

log = logging.getLogger(__name__)

BUILTIN_CORPUS = Path(__file__).parent / "data" / "keystats_corpus.txt"
DEFAULT_SAMPLES = 20000
SEQ_LEN = 128  # tokens per row: long enough for ordinary context, short enough for fast batches
GEN_SEED = 1234


def read_paragraphs(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    paras = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n")]
    return [p for p in paras if p]


def corpus_id(corpus: str | Path | None) -> tuple[str, list[str]]:
    """(hash used in cache keys, paragraphs) for a corpus file or the built-in one."""
    path = Path(corpus) if corpus is not None else BUILTIN_CORPUS
    if not path.exists():
        raise KeditError(f"key-statistics corpus {path} does not exist")
    text = path.read_text(encoding="utf-8")
    paras = read_paragraphs(text)
    if not paras:
        raise KeditError(f"key-statistics corpus {path} holds no text")
    tag = "builtin+gen" if corpus is None else "file"
    return hashlib.sha256((tag + "\n" + text).encode()).hexdigest()[:12], paras


@torch.no_grad()
def sampled_paragraphs(lm: LoadedModel, seeds: list[str], n_tokens: int, max_new: int = 96, batch: int = 128) -> list[str]:
    """Continuations the model samples from the first words of each seed paragraph, cached
    by model fingerprint and by the openings they start from, so every later run reads the
    same text and an edited seed corpus gets fresh text."""
    starts = [" ".join(p.split()[:6]) for p in seeds]
    seeds_id = hashlib.sha256("\n".join(starts).encode()).hexdigest()[:12]
    cache = kedit_home() / "keystats" / f"generated_{lm.fingerprint[:16]}_{seeds_id}_{n_tokens}_{GEN_SEED}.txt"
    if cache.exists():
        return read_paragraphs(cache.read_text(encoding="utf-8"))
    n_rows = max(1, -(-n_tokens // max_new))
    prompts = [starts[i % len(starts)] for i in range(n_rows)]
    samples = sample_texts(lm, prompts, max_new, batch, "Sampling key-statistics text")
    out = [" ".join((p + g).split()) for p, g in zip(prompts, samples)]
    _write_text(cache, "\n\n".join(out))
    return out


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


@torch.no_grad()
def sample_texts(lm: LoadedModel, prompts: list[str], max_new: int, batch: int = 128, desc: str = "Sampling") -> list[str]:
    """One nucleus-sampled continuation (p=0.95, `max_new` tokens) per prompt, from a seeded
    generator of its own: the same text for the same model, whatever the global RNG did."""
    from tqdm.auto import tqdm

    tok, model, device = lm.tokenizer, lm.model, lm.device
    out: list[str] = []
    gen = torch.Generator(device="cpu").manual_seed(GEN_SEED)
    bar = tqdm(total=len(prompts) * max_new, desc=desc, unit="tok", leave=False)
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        enc = [tok.encode(p, add_special_tokens=False) for p in chunk]
        # Own sampling loop (KV cache, left padding) rather than `generate`: it draws from our
        # own seeded Generator, so the text does not depend on global RNG state.
        width = max(len(e) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            att[i, width - len(e) :] = 1
        ids, att = ids.to(device), att.to(device)
        pos = (att.cumsum(1) - 1).clamp_min(0)
        past = None
        new_tokens: list[torch.Tensor] = []
        cur_ids, cur_pos = ids, pos
        for _ in range(max_new):
            # bfloat16 autocast: ~2x faster on AVX512-BF16 CPUs, and sampled text needs no more precision
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=autocast_bf16(device, lm.dtype, True)):
                out_m = model(input_ids=cur_ids, attention_mask=att, position_ids=cur_pos, use_cache=True,
                              **kv_cache_kwargs(model, past))
            past = kv_cache_of(out_m)
            probs = torch.softmax(out_m.logits[:, -1].float().cpu(), -1)
            # nucleus sampling (p=0.95): varied but fluent text
            sp, si = probs.sort(-1, descending=True)
            sp[(sp.cumsum(-1) - sp) > 0.95] = 0
            nxt = si.gather(1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen))
            new_tokens.append(nxt[:, 0])
            cur_ids = nxt.to(device)
            cur_pos = cur_pos[:, -1:] + 1
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
            bar.update(len(chunk))
        gen_ids = torch.stack(new_tokens, 1)
        out.extend(tok.decode(g.tolist(), skip_special_tokens=True) for g in gen_ids)
    bar.close()
    return out


def _rows(lm: LoadedModel, paragraphs: list[str], samples: int) -> list[list[int]]:
    """Token rows of at most SEQ_LEN, each starting at a paragraph or chunk boundary,
    until `samples` positions are collected."""
    rows, total = [], 0
    for p in paragraphs:
        ids = lm.tokenizer.encode(p, add_special_tokens=False)
        for s in range(0, len(ids), SEQ_LEN):
            chunk = ids[s : s + SEQ_LEN]
            if len(chunk) < 2:
                continue
            chunk = chunk[: samples - total]
            rows.append(chunk)
            total += len(chunk)
            if total >= samples:
                return rows
    return rows


def _read_cached(paths: dict[int, Path], key: str) -> tuple[dict[int, torch.Tensor], list[int]]:
    """(tensors already cached, layers still to compute), by layer."""
    from safetensors.torch import load_file

    out, missing = {}, []
    for layer in sorted(paths):
        if paths[layer].exists():
            out[layer] = load_file(str(paths[layer]))[key]
        else:
            missing.append(layer)
    return out, missing


def _topped_up(lm: LoadedModel, paragraphs: list[str], corpus: str | Path | None, samples: int) -> list[str]:
    """The built-in corpus topped up with model samples to `samples` tokens (a file corpus as is)."""
    if corpus is None:
        have = sum(len(lm.tokenizer.encode(p, add_special_tokens=False)) for p in paragraphs)
        if have < samples:
            paragraphs = paragraphs + sampled_paragraphs(lm, paragraphs, samples - have)
    return paragraphs


def _forward_rows(
    lm: LoadedModel, rows: list[list[int]], stop_layer: int, batch_size: int, cur_mask: dict[str, torch.Tensor],
    on_batch: Callable[[int], Any] | None = None,
) -> int:
    """Run token `rows` in padded batches through decoder layers 0..`stop_layer` (the rest is
    skipped), for forward pre-hooks that read MLP keys; `cur_mask["m"]` holds the batch's
    real-token mask while it runs. Returns the number of real token positions."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    count = 0
    with stop_after(lm.model, stop_layer), torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = torch.tensor(r)
                att[i, : len(r)] = 1
            cur_mask["m"] = att.bool().to(lm.device)
            try:
                lm.model.base_model(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device), use_cache=False)
            except StopForward:
                pass
            n = int(att.sum())
            count += n
            if on_batch is not None:
                on_batch(n)
    return count


def _cache_path(lm: LoadedModel, layer: int, cid: str, samples: int) -> Path:
    return kedit_home() / "keystats" / f"{lm.fingerprint[:16]}_L{layer}_{cid}_{samples}.safetensors"


def key_second_moment(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict[int, torch.Tensor]:
    """C_l = E[k k^T] (float64, [inter, inter]) for each layer, from `samples` token positions.

    All missing layers are computed in one pass over the text (the forward stops after the
    deepest one); cached files are read back without touching the model.
    """
    from safetensors.torch import save_file

    cid, paragraphs = corpus_id(corpus)
    out, missing = _read_cached({l_: _cache_path(lm, l_, cid, samples) for l_ in layers}, "mom2")
    if not missing:
        return out
    paragraphs = _topped_up(lm, paragraphs, corpus, samples)
    rows = _rows(lm, paragraphs, samples)
    n_pos = sum(len(r) for r in rows)
    if n_pos < samples:
        log.warning("key statistics: corpus holds %d token positions, fewer than the %d asked for", n_pos, samples)

    from tqdm.auto import tqdm

    sums: dict[int, torch.Tensor] = {}
    cur_mask: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_m, args):
            k = args[0][cur_mask["m"]].double()  # real (non-pad) positions only
            sums[layer] = sums[layer] + k.T @ k if layer in sums else k.T @ k

        return hook

    deepest = max(missing)
    handles = [edit_site(lm.model, l_).module.register_forward_pre_hook(make_hook(l_)) for l_ in missing]
    bar = tqdm(total=n_pos, desc=f"Key statistics (layers {missing})", unit="tok", disable=not show_progress, leave=False)
    try:
        count = _forward_rows(lm, rows, deepest, batch_size, cur_mask, on_batch=bar.update)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    for layer in missing:
        c = (sums[layer] / max(count, 1)).cpu()
        path = _cache_path(lm, layer, cid, samples)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            save_file({"mom2": c.contiguous()}, str(tmp), metadata={"positions": str(count), "layer": str(layer)})
        out[layer] = c
    return out


def _generic_keys_path(lm: LoadedModel, layer: int, cid: str, samples: int, positions: int) -> Path:
    return kedit_home() / "keystats" / f"{lm.fingerprint[:16]}_L{layer}_{cid}_{samples}_keys{positions}.safetensors"


def generic_keys(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: str | Path | None = None,
    positions: int = 4096,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """Raw MLP keys ([n, inter], float32, n <= positions) of ordinary text at each layer:
    every 7th paragraph of the text the key statistics over `samples` positions use (the
    built-in prose and, by default, model samples alike), cached like the second moments.
    The update gate (`kedit_core.editors.update_gate`) takes its threshold from how large an
    update is on these positions."""
    cid, paragraphs = corpus_id(corpus)
    out, missing = _read_cached({l_: _generic_keys_path(lm, l_, cid, samples, positions) for l_ in layers}, "keys")
    if not missing:
        return out
    paragraphs = _topped_up(lm, paragraphs, corpus, samples)  # the same text the key statistics use
    rows = _rows(lm, paragraphs[::7] or paragraphs, positions)
    paths = {l_: _generic_keys_path(lm, l_, cid, samples, positions) for l_ in missing}
    return out | _cached_keys_of_rows(lm, rows, paths, batch_size)


def _cached_keys_of_rows(lm: LoadedModel, rows: list[list[int]], paths: dict[int, Path],
                         batch_size: int = 16) -> dict[int, torch.Tensor]:
    """MLP keys ([n, inter], float32) at every real position of token `rows`, for each layer
    in `paths`, each written to its path (tmp, then replace)."""
    from safetensors.torch import save_file

    got: dict[int, list[torch.Tensor]] = {l_: [] for l_ in paths}
    cur_mask: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_m, args):
            got[layer].append(args[0][cur_mask["m"]].detach().float().cpu())

        return hook

    handles = [edit_site(lm.model, l_).module.register_forward_pre_hook(make_hook(l_)) for l_ in paths]
    try:
        _forward_rows(lm, rows, max(paths), batch_size, cur_mask)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, path in paths.items():
        keys = torch.cat(got[layer])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            save_file({"keys": keys.contiguous()}, str(tmp), metadata={"positions": str(len(keys)), "layer": str(layer)})
        out[layer] = keys
    return out


# Served chats for the update gate: the model asks itself questions of the kind users ask
# (entity-rich: people, places, works) and answers them as the server would. Their keys are
# what the gate must leave alone at serving time; prose from the corpus is not enough
# (docs/editing.md, "Served answers": on such chats ~1% of positions passed a threshold
# set on prose at the 0.999 quantile, and half of all unrelated replies changed).
CHAT_QUESTION_REQUESTS = (
    "Ask me one short trivia question about a famous person. Reply with the question only.",
    "Ask me one short trivia question about a city or a country. Reply with the question only.",
    "Ask me one short trivia question about a book, film, song or team. Reply with the question only.",
    "Ask me one short question about history, science or sport. Reply with the question only.",
)
CHAT_SAMPLES = 192  # chats; with their replies about 20,000 token positions


def _chat_keys_path(lm: LoadedModel, layer: int, n: int) -> Path:
    return kedit_home() / "keystats" / f"{lm.fingerprint[:16]}_L{layer}_chats{n}_{GEN_SEED}_keys.safetensors"


def served_chats(lm: LoadedModel, n: int = CHAT_SAMPLES) -> list[str]:
    """`n` one-question chats rendered as the server renders them, each followed by the
    model's greedy reply: questions the model samples itself (no data set needed), cached."""
    cache = kedit_home() / "keystats" / f"chats_{lm.fingerprint[:16]}_{n}_{GEN_SEED}.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    # the model follows "reply with the question only" loosely on 135M parameters; what it
    # writes is still the kind of chat the server sees, which is what the gate needs
    asks = [chat_prompt(lm, CHAT_QUESTION_REQUESTS[i % len(CHAT_QUESTION_REQUESTS)]) for i in range(n)]
    questions = [(q.strip().split("\n")[0].strip() or "What is it?") for q in
                 sample_texts(lm, asks, 32, batch=32, desc="Sampling served chats")]
    chats = [chat_prompt(lm, q) + r for q, r in zip(questions, answer_many(lm, questions))]
    _write_text(cache, json.dumps(chats, ensure_ascii=False))  # JSON: chats keep their newlines
    return chats


def chat_keys(lm: LoadedModel, layers: Sequence[int], n: int = CHAT_SAMPLES) -> dict[int, torch.Tensor]:
    """MLP keys ([m, inter], float32) at every position of `served_chats` (the template's own
    tokens, the question, the reply), cached per model. The update gate's threshold is never
    below the update's size on these: what users ask and read must see the unedited layer."""
    out, missing = _read_cached({l_: _chat_keys_path(lm, l_, n) for l_ in layers}, "keys")
    if not missing:
        return out
    rows = [lm.tokenizer.encode(c, add_special_tokens=False)[:SEQ_LEN * 2] for c in served_chats(lm, n)]
    return out | _cached_keys_of_rows(lm, rows, {l_: _chat_keys_path(lm, l_, n) for l_ in missing})
