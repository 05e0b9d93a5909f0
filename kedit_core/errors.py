"""The base of every error kedit reports to a user as one clear line (no traceback).

Raise a subclass with a message that says what went wrong and what to do; the CLI and the
flows catch `KeditError` and print or record that message.
"""
from __future__ import annotations


class KeditError(RuntimeError):
    """An expected failure with a message meant for the user."""
