"""The official `kaggle` client, called safely: in a worker process, with a deadline, errors made plain.

Every call: check the client is installed (without importing it), check credentials exist (without
reading them into any output), run `worker.py` with a timeout, and turn whatever happened into either a
result or one `KaggleError` line, with every known secret scrubbed from it.

Pointing the client at another server: set KAGGLETRAIN_KAGGLE_ENDPOINT=http://127.0.0.1:PORT. The client
has no endpoint setting of its own, only KAGGLE_API_ENVIRONMENT (LOCALHOST means http://localhost:80), so
the worker sets that and routes its plain-HTTP requests to the given address with the standard http_proxy
variable, which `requests` honours. Only loopback addresses are accepted: credentials travel in clear over
plain HTTP. The tests use this with `fake_server.FakeKaggle`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from kaggletrain.errors import KaggleError
from kaggletrain.kaggle.credentials import WHERE, find_credentials, scrub

ENDPOINT_ENV = "KAGGLETRAIN_KAGGLE_ENDPOINT"
TIMEOUT_ENV = "KAGGLETRAIN_KAGGLE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
TERMINAL = {"complete", "error", "cancel_acknowledged"}
_WORKER = Path(__file__).with_name("worker.py")


def default_timeout(fallback: float = DEFAULT_TIMEOUT) -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return fallback
    try:
        value = float(raw)
    except ValueError:
        raise KaggleError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise KaggleError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Verbose client mode prints request headers, Authorization included: never let it switch on.
    for var in ("VERBOSE", "VERBOSE_OUTPUT"):
        env.pop(var, None)
    endpoint = env.get(ENDPOINT_ENV)
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.port:
            raise KaggleError(f"{ENDPOINT_ENV}={endpoint!r}: expected http://127.0.0.1:PORT (a local test server)")
        env["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
        proxy = f"http://{parts.hostname}:{parts.port}"
        for var in ("http_proxy", "HTTP_PROXY"):
            env[var] = proxy
        for var in ("no_proxy", "NO_PROXY"):
            env[var] = ""
    return env


def _preflight() -> list[str]:
    """Client installed and credentials present, else a clear error. Returns the secrets for scrubbing."""
    if importlib.util.find_spec("kaggle") is None:
        raise KaggleError("the kaggle client is not installed: pip install 'kaggletrain[kaggle]' (or kaggle six)")
    if importlib.util.find_spec("six") is None:
        raise KaggleError("the kaggle client imports 'six' without declaring it: pip install six")
    creds = find_credentials()
    if not creds.found:
        raise KaggleError(f"no Kaggle credentials found: {WHERE}")
    return creds.secrets


def call(op: str, request: dict, timeout: float | None = None) -> dict:
    """Run one client operation in the worker; return its result dict or raise KaggleError."""
    secrets = _preflight()
    env = _worker_env()
    timeout = timeout if timeout is not None else default_timeout()
    with tempfile.TemporaryDirectory(prefix="kaggletrain-api-") as tmp:
        req_path, res_path = Path(tmp, "request.json"), Path(tmp, "result.json")
        req_path.write_text(json.dumps(request), encoding="utf-8")
        cmd = [sys.executable, str(_WORKER), op, str(req_path), str(res_path)]
        try:
            # stdin closed: the client sometimes asks yes/no questions; it must get EOF, not wait forever.
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KaggleError(
                f"the Kaggle API did not answer within {timeout:g} s ({op}); check your network or raise "
                f"--timeout / {TIMEOUT_ENV}"
            ) from None
        if not res_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise KaggleError(scrub(f"the kaggle client crashed ({op}, exit {proc.returncode}): {tail[0]}",
                                    secrets))
        answer = json.loads(res_path.read_text(encoding="utf-8"))
    if not answer.get("ok"):
        raise KaggleError(scrub(_explain(op, request, answer), secrets))
    return answer["result"]


def _explain(op: str, request: dict, answer: dict) -> str:
    kind, status, message = answer.get("kind"), answer.get("status"), _one_line(answer.get("message", ""))
    target = request.get("kernel") or request.get("ref") or ""
    if kind == "credentials":
        return f"the kaggle client found no usable credentials: {WHERE}"
    if kind == "missing_module":
        module = answer.get("module") or "?"
        hint = "pip install six" if module == "six" else f"pip install {module}"
        return f"the kaggle client cannot import {module!r}: {hint}"
    if kind == "http" and status in (401,):
        return f"Kaggle refused the credentials (HTTP 401): check them or create a new token; {WHERE}"
    if kind == "http" and status in (403, 404) and op == "push":
        return (f"Kaggle refused to save {target} (HTTP {status}): the owner in the kernel id must be your own "
                f"user name (--owner)")
    if kind == "http" and status in (403, 404) and target:
        return f"kernel {target} not found, or not visible to these credentials (HTTP {status})"
    if kind == "http":
        return f"Kaggle API error during {op} (HTTP {status}): {message}"
    if kind == "network":
        return f"cannot reach the Kaggle API during {op}: {message}"
    if kind == "client":
        return f"the kaggle client rejected the {op}: {message}"
    return f"the kaggle client failed during {op}: {answer.get('type', 'error')}: {message}"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------- operations


def push(folder: Path, ref: str, timeout: float | None = None) -> dict:
    """Push a validated kernel folder; a response carrying `error` is a failure even though the client
    does not raise for it."""
    result = call("push", {"folder": str(folder), "ref": ref}, timeout)
    if result.get("error"):
        raise KaggleError(f"Kaggle rejected the push of {ref}: {_one_line(result['error'])}")
    bad = result.get("invalid_dataset_sources") or []
    if bad:
        raise KaggleError(
            f"pushed {ref}, but Kaggle did not attach the datasets {', '.join(bad)} (wrong name, or not visible "
            f"to you): the run will not find its data; fix --dataset and push again"
        )
    return result


def status(kernel: str, timeout: float | None = None) -> dict:
    return call("status", {"kernel": kernel}, timeout)


def output(kernel: str, out_dir: Path, pattern: str | None = None, timeout: float | None = None) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = call("output", {"kernel": kernel, "path": str(out_dir), "pattern": pattern}, timeout)
    return result["files"]
