"""The `kedit` command line (Typer). Commands live in small modules under
`flows/commands/`, each exposing `register(app)`; this file wires them and turns known
errors into one clear line instead of a traceback."""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys

import typer

app = typer.Typer(
    help="kedit: keep a served language model's knowledge current with gated, reversible edits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    import flows.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"flows.commands.{mod.name}")
        module.register(app)


def _quiet_libraries() -> None:
    # transformers prints per-load progress bars and advice that bury kedit's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    from kedit_core.errors import KeditError

    _quiet_libraries()
    _register_commands()
    try:
        app()
    except KeditError as exc:  # expected failures: one clear message, no traceback
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
