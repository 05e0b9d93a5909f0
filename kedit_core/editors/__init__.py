"""Editing methods behind one interface (see `base`). Importing this package registers
every method module in it (`memit`, `alphaedit`, `rag`, `finetune`, `lte`, ...)."""
from __future__ import annotations

import importlib
import pkgutil

from kedit_core.editors.base import (  # noqa: F401
    EDITORS,
    CaseDiagnostics,
    Editor,
    EditorConfig,
    EditResult,
    available_editors,
    get_editor,
    register,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
