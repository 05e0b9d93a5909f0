"""Does a free reply state a value? The one matching rule for served answers.

The served-answer protocol (served_answers.py) scores replies with it, and the served
memory's check (edit_scope.py, answer.py) asks it whether the weights' reply states the
fact put in front of the question. Both compare normalised text as whole words
(`render.normalise_form`: case, accents, punctuation and number renderings folded).
"""
from __future__ import annotations

from typing import Sequence

from kedit_core.render import normalise_form as normalise


def _spans(text: str, form: str) -> list[tuple[int, int]]:
    """Character spans of whole-word occurrences of `form` in `text` (both normalised)."""
    padded, needle = f" {text} ", f" {form} "
    out, at = [], padded.find(needle)
    while form and at >= 0:
        out.append((at, at + len(needle)))
        at = padded.find(needle, at + 1)
    return out


def answer_forms(answer: str, aliases: Sequence[str] = ()) -> list[str]:
    """The normalised renderings that count as stating `answer` (empty ones dropped)."""
    forms = []
    for a in [answer, *aliases]:
        n = normalise(a or "")
        if n and n not in forms:
            forms.append(n)
    return forms


def states_answer(reply: str, new_forms: Sequence[str], old_forms: Sequence[str] = ()) -> bool:
    """True when the reply mentions a new form and no old form, where a mention inside a
    mention of the other value does not count: "Paris Saint-Germain" is no mention of an
    old "Paris", and "14 March 1879" (old) is no mention of a new "1879"."""
    text = normalise(reply)
    new = [sp for f in new_forms for sp in _spans(text, f)]
    old = [sp for f in old_forms if f not in new_forms for sp in _spans(text, f)]

    def inside(sp: tuple[int, int], others: list[tuple[int, int]]) -> bool:
        return any(o[0] <= sp[0] and sp[1] <= o[1] and o != sp for o in others)

    return any(not inside(sp, old) for sp in new) and all(inside(sp, new) for sp in old)
