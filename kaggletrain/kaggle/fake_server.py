"""A local stand-in for the Kaggle API, enough for push, status and output downloads.

It speaks what the installed client (kaggle 2.x / kagglesdk) sends: `POST /api/v1/<Service>/<Method>` with a
JSON body in camelCase, answered with JSON; errors as `{"code": N, "message": ...}` with that HTTP status.
Because the client reaches it through an HTTP proxy setting (see api.py), request lines may carry absolute
URLs (`POST http://localhost/api/v1/...`); both forms are accepted.

Every request is recorded (method, path, JSON body, the authenticated user name; never the secret) so tests
can check exactly what the real client sent. Use as a context manager::

    with FakeKaggle() as server:
        os.environ["KAGGLETRAIN_KAGGLE_ENDPOINT"] = server.url
        ...
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_API = "/api/v1/"


@dataclass
class FakeKernel:
    status: str = "QUEUED"  # QUEUED RUNNING COMPLETE ERROR CANCEL_ACKNOWLEDGED ...
    failure_message: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # output name (may contain '/') -> bytes
    log: str = ""
    versions: int = 0
    upcoming: list[str] = field(default_factory=list)  # statuses to move through, one per status call


class FakeKaggle:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.kernels: dict[str, FakeKernel] = {}
        self.push_error = ""  # non-empty: SaveKernel answers 200 with this `error` (as Kaggle does)
        self.known_datasets: set[str] | None = None  # None: every dataset exists
        self.reject_auth = False  # answer 401 to everything
        self.tokens: dict[str, str] = {}  # access token -> user name, for IntrospectToken
        self.hang = threading.Event()  # set: API calls block until release() (timeout tests)
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FakeKaggle":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        self._release.set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def calls(self, method: str) -> list[dict]:
        """Recorded requests to one API method, e.g. 'SaveKernel'."""
        return [r for r in self.requests if r["path"].endswith("/" + method)]

    # ------------------------------------------------------------ API methods
    def SaveKernel(self, body: dict) -> tuple[int, dict]:
        if self.push_error:
            return 200, {"error": self.push_error}
        ref = body.get("slug") or ""
        kernel = self.kernels.setdefault(ref, FakeKernel())
        kernel.versions += 1
        kernel.status = "QUEUED"
        sources = body.get("datasetDataSources") or []
        invalid = [] if self.known_datasets is None else [d for d in sources if d not in self.known_datasets]
        return 200, {"ref": f"/code/{ref}", "url": f"https://www.kaggle.com/code/{ref}",
                     "versionNumber": kernel.versions, "error": "", "invalidDatasetSources": invalid}

    def GetKernelSessionStatus(self, body: dict) -> tuple[int, dict]:
        kernel = self.kernels.get(f"{body.get('userName')}/{body.get('kernelSlug')}")
        if kernel is None:
            return 404, {"code": 404, "message": "Kernel not found"}
        if kernel.upcoming:
            kernel.status = kernel.upcoming.pop(0)
        return 200, {"status": kernel.status, "failureMessage": kernel.failure_message}

    def ListKernelSessionOutput(self, body: dict) -> tuple[int, dict]:
        ref = f"{body.get('userName')}/{body.get('kernelSlug')}"
        kernel = self.kernels.get(ref)
        if kernel is None:
            return 404, {"code": 404, "message": "Kernel not found"}
        files = [{"fileName": name, "url": f"{self.url}/_files/{ref}/{name}"} for name in sorted(kernel.files)]
        return 200, {"files": files, "log": kernel.log}

    def IntrospectToken(self, body: dict) -> tuple[int, dict]:
        user = self.tokens.get(body.get("token", ""))
        return 200, ({"active": True, "username": user} if user else {"active": False})

    def file_bytes(self, path: str) -> bytes | None:
        owner, slug, name = unquote(path[len("/_files/"):]).split("/", 2)
        kernel = self.kernels.get(f"{owner}/{slug}")
        return None if kernel is None else kernel.files.get(name)


def _auth_user(header: str | None) -> str | None:
    """The user name of a Basic header, or 'bearer' for a token; the secret itself is not kept."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().split(":", 1)[0]
        except (ValueError, UnicodeDecodeError):
            return "?"
    return scheme.lower()


def _handler_for(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, code: int, payload: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _record(self, body: dict | None) -> str:
            path = urlsplit(self.path).path  # absolute-form (via proxy) or origin-form
            fake.requests.append({"method": self.command, "path": path, "body": body,
                                  "user": _auth_user(self.headers.get("Authorization"))})
            return path

        def do_GET(self) -> None:
            path = self._record(None)
            data = fake.file_bytes(path) if path.startswith("/_files/") else None
            if data is None:
                self._json(404, {"code": 404, "message": "Not found"})
            else:
                self._send(200, data, "application/octet-stream")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                body = {"_raw": raw.decode(errors="replace")}
            path = self._record(body)
            if fake.hang.is_set():
                fake._release.wait(60)
            if fake.reject_auth or not self.headers.get("Authorization"):
                self._json(401, {"code": 401, "message": "Unauthenticated"})
                return
            method = path[len(_API):].rsplit("/", 1)[-1] if path.startswith(_API) else ""
            handler = getattr(fake, method, None) if method[:1].isupper() else None
            if handler is None:
                self._json(404, {"code": 404, "message": f"no fake for {path}"})
                return
            code, obj = handler(body)
            self._json(code, obj)

    return Handler
