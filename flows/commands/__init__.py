"""The `kedit` command groups, one module each; help texts they share live here."""

MODEL_HELP = "Model: 'smollm2' (embedded default) or a local Hugging Face model directory."
DB_HELP = "Ledger file (default: KEDIT_HOME/kedit.duckdb)."
WAIT_HELP = "Seconds to wait for another run that holds the ledger (default: fail at once, naming it)."


def _placement_options():
    """`--device` and `--dtype`, defined once and shared by every command that loads a model
    (None: KEDIT_DEVICE / KEDIT_DTYPE, else cpu / float32; checked in kedit_core/device.py)."""
    import typer

    from kedit_core.device import DEVICE_HELP, DTYPE_HELP

    return (typer.Option(None, "--device", help=DEVICE_HELP, show_default=False),
            typer.Option(None, "--dtype", help=DTYPE_HELP, show_default=False))


DEVICE_OPTION, DTYPE_OPTION = _placement_options()


def _config_option():
    import typer

    return typer.Option(None, "--config", show_default=False,
                        help="Editor settings from a TOML or YAML file (top-level keys, and a table per method); "
                             "--set wins over it.")


CONFIG_OPTION = _config_option()


def with_config(config, method: str | None, settings: list[str]) -> list[str]:
    """The `--config` file's settings for `method` (default: the pipeline's), then `--set`'s."""
    if config is None:
        return list(settings)
    from flows.services.settings import PipelineSettings
    from kedit_core.editor_settings import settings_file

    return settings_file(config, method or PipelineSettings.from_env().method) + list(settings)
