"""kedit's application layer: the services a run is made of.

Each function here does one piece of a run with real parts (the ledger, the live model,
the Wikidata client): ingest a window of revisions (`ingest.py`, `steps.ingest_window`),
turn stored fact changes into edit cases (`steps.build_pending_cases`), apply them in
gated batches (`gated_batches.py`), publish the live version (`steps`, `publish.py`),
run the full regression check and write the drift report (`steps`), export a version
(`export.py`), compare methods (`comparison.py`), evaluate one on a benchmark
(`evaluation.py`), give `kedit serve` its versions from the ledger (`serving.py`) and audit
them (`audit.py`). `runtime.py` holds the live model and rebuilds any version from the
ledger; `settings.py` the settings every service reads.

Who calls them: the Prefect flows (`flows/prefect_flows.py`) schedule them with retries,
the CLI (`flows/cli.py`, `flows/commands/`) starts them, and the tests call them directly.
Nothing here imports Prefect, the flows or the CLI (tests/unit/test_layers.py).
"""
