"""Kaggle integration: turn a run config into a Kaggle notebook kernel, push it, follow it, pull its outputs.

Modules (nothing here imports the `kaggle` client; only `api.py` talks to it, through a subprocess):
- `metadata.py`: accelerators, slugs, `kernel-metadata.json` building and validation (before any network call).
- `bundle.py`: the kaggletrain sources packed into a base64 zip that the notebook carries.
- `notebook.py`: the `.ipynb` (set-up, data search, training launch) and `kernel.py`: the kernel folder.
- `kernel_runtime.py`: the stdlib-only helpers the notebook runs on Kaggle (paths, deps, data search, launch).
- `credentials.py`: where credentials live (never their values in any output).
- `api.py` + `worker.py`: the official client, run in a worker process with a deadline.
- `fake_server.py`: a local stand-in for the Kaggle API for tests and offline demos.
- `rehearse.py`: run a generated notebook locally the way Kaggle will.
"""
