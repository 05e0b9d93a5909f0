"""The `kedit` command groups, one module each; help texts they share live here."""

MODEL_HELP = "Model: 'smollm2' (embedded default) or a local Hugging Face model directory."
DB_HELP = "Ledger file (default: KEDIT_HOME/kedit.duckdb)."
WAIT_HELP = "Seconds to wait for another run that holds the ledger (default: fail at once, naming it)."
