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

    if app.registered_commands:  # once per process (main() may run more than once in tests)
        return
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


DEBUG_ENV = "KEDIT_DEBUG"
_DEBUG = {"on": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help=f"On an unexpected error, show the traceback (or set {DEBUG_ENV}=1)."),
) -> None:
    """kedit: keep a served language model's knowledge current with gated, reversible edits."""
    if debug:
        _DEBUG["on"] = True


def _debugging() -> bool:
    return _DEBUG["on"] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _command_of(argv: list[str]) -> str:
    """'kedit report', 'kedit server load', ...: the command a failure is named after."""
    groups = {g.name for g in app.registered_groups if g.name}
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return "kedit"
    return "kedit " + " ".join(words[:2] if words[0] in groups and len(words) > 1 else words[:1])


def describe_unexpected(exc: BaseException) -> str:
    """One line naming what went wrong, for an exception kedit did not anticipate."""
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a directory, not a file"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")


def _fail(line: str, code: int) -> None:
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: a KeditError is one line (exit 2); anything unexpected is one line naming
    the exception and the command (exit 1), with the traceback only under --debug / KEDIT_DEBUG=1."""
    from kedit_core.errors import KeditError

    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG["on"] = False
    if "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        # accepted anywhere (kedit report --debug); the root option takes it first
        argv.remove("--debug")
        argv.insert(0, "--debug")
        _DEBUG["on"] = True
    _quiet_libraries()
    _register_commands()
    try:
        app(args=argv, prog_name="kedit")
    except KeditError as exc:  # expected failures: one clear message, no traceback
        if _debugging():
            raise
        _fail(" ".join(str(exc).split()) or type(exc).__name__, 2)
    except KeyboardInterrupt:
        _fail(f"{_command_of(argv)}: interrupted", 130)
    except Exception as exc:  # the unexpected: still one line, the traceback on request
        if _debugging():
            raise
        _fail(f"{_command_of(argv)}: {describe_unexpected(exc)} (run with --debug for the traceback)", 1)


if __name__ == "__main__":
    main()
