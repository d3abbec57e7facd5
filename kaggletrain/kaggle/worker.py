"""Runs one call of the official `kaggle` client in its own process; `api.py` starts it with a deadline.

Usage (internal): python worker.py OP REQUEST.json RESULT.json

Why a separate process: `import kaggle` authenticates at import time, prints to stdout and can block (an
access token is checked over the network, without a timeout); no client call takes a timeout either. A
process can be killed at the deadline, a thread cannot. The result goes to a file, never to stdout, so
whatever the client prints cannot be mistaken for it.

Run as a script, not as `-m kaggletrain...`: importing kaggletrain is not needed here, and the script's own
folder (which holds modules such as notebook.py) is removed from sys.path so it shadows nothing.
"""

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

_HERE = os.path.dirname(os.path.abspath(__file__))


def _push(api, req):
    r = api.kernels_push(req["folder"], timeout=req.get("session_timeout"))
    if r is None:
        return {"error": "the client returned no response"}
    return {"ref": r.ref, "url": r.url, "version": r.version_number, "error": r.error or "",
            "invalid_dataset_sources": list(r.invalid_dataset_sources or []),
            "invalid_tags": list(r.invalid_tags or [])}


def _status(api, req):
    r = api.kernels_status(req["kernel"])
    status = getattr(r.status, "name", str(r.status or "")).lower()
    return {"status": status, "failure_message": r.failure_message or ""}


def _output(api, req):
    files, _ = api.kernels_output(req["kernel"], req["path"], file_pattern=req.get("pattern"), force=True,
                                  quiet=True)
    return {"files": list(files)}


def _whoami(api, req):
    # After authenticate() the client knows the user name, also for an access token (it asked the server).
    return {"username": api.config_values.get("username")}


OPS = {"push": _push, "status": _status, "output": _output, "whoami": _whoami}


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc):
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def run(op, req):
    captured = io.StringIO()
    try:
        with redirect_stdout(captured), redirect_stderr(captured):
            import kaggle  # noqa: F401  (authenticates and prints at import; captured here)
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            try:
                api.authenticate()
            except SystemExit:  # the client's "no credentials" path calls exit(1)
                return {"ok": False, "kind": "credentials", "message": "no usable credentials"}
            result = OPS[op](api, req)
        return {"ok": True, "result": result, "log": captured.getvalue()[-4000:]}
    except ModuleNotFoundError as e:
        return {"ok": False, "kind": "missing_module", "module": e.name, "message": str(e)}
    except Exception as e:  # noqa: BLE001  (every failure becomes one structured answer)
        import requests

        # The client re-raises some HTTP errors as ValueError with a long story; the status is in the chain.
        http = next((x for x in _chain(e) if isinstance(x, requests.exceptions.HTTPError)), None)
        if http is not None:
            kind, e = "http", http
        elif isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            kind = "network"
        elif isinstance(e, ValueError):
            kind = "client"
        else:
            kind = "unexpected"
        return {"ok": False, "kind": kind, "status": _http_status(e), "message": f"{e}" or type(e).__name__,
                "type": type(e).__name__, "log": captured.getvalue()[-4000:]}


def main(argv):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    op, req_path, res_path = argv
    with open(req_path, encoding="utf-8") as f:
        req = json.load(f)
    result = run(op, req)
    with open(res_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
