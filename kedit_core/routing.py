"""Which layers answer a forward pass: the update gate's routing switch and where the
installed gate hangs on the model.

Kept apart from `kedit_core/editors/update_gate.py` (which re-exports these names) so that
what only asks "is a gate installed, how is this question routed" (`answer.py`, the server)
does not import the editors package, whose `__init__` imports every editor, and so that the
key statistics can build served chats with `answer.py` without an import cycle
(answer -> update_gate -> keystats -> answer).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from kedit_core.editors.update_gate import UpdateGate

GATE_ATTR = "_kedit_update_gate"  # where the installed gate hangs on the torch model

# How the edited layers answer the forward pass running in this thread (edit_scope.py):
# None = by the gate alone (editing, teacher-forced scoring, a question in the edits' scope);
# "out" = a question outside the edits' scope: the base layers answer. (A question in scope
# is still gated: the whole update, ungated, garbled replies: served efficacy 0.80 -> 0.70,
# docs/editing.md "Served answers".)
# A context variable, not a flag on the model: the server answers requests in parallel threads.
ROUTE: ContextVar[str | None] = ContextVar("kedit_edit_route", default=None)


@contextmanager
def routed(in_scope: bool | None) -> Iterator[None]:
    """Run forward passes inside as for a question in (True) or out of (False) the edits'
    scope; None leaves the gate alone."""
    token = ROUTE.set("out" if in_scope is False else None)
    try:
        yield
    finally:
        ROUTE.reset(token)


def installed_update_gate(lm: Any) -> UpdateGate | None:
    """The update gate installed on `lm`'s model (a `LoadedModel`), if any."""
    return getattr(lm.model, GATE_ATTR, None)
