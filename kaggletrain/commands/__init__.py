"""One module per CLI command group; each registers on `kaggletrain.cli.app` when imported."""
