"""Where Kaggle credentials live, found without importing the `kaggle` client.

We only need to know (a) whether any exist, to fail fast with a helpful line instead of letting the client
print its help text or block, (b) the username, for the kernel id, and (c) the secret values, so that any text
we surface (client errors, logs) can be scrubbed of them. Values are never written anywhere.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

WHERE = (
    "put your API credentials in ~/.kaggle/kaggle.json ({\"username\": ..., \"key\": ...}, chmod 600), "
    "or set KAGGLE_USERNAME and KAGGLE_KEY, or put an access token in KAGGLE_API_TOKEN or ~/.kaggle/access_token "
    "(create them at https://www.kaggle.com/settings, API section)"
)


@dataclass
class Credentials:
    source: str | None = None  # human description of where they came from; None: nothing found
    username: str | None = None
    secrets: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.source is not None


def _config_dirs() -> list[Path]:
    # The client's own search order: KAGGLE_CONFIG_DIR, else ~/.kaggle, else $XDG_CONFIG_HOME/kaggle.
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    home = Path(os.path.expanduser("~"))
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return [home / ".kaggle", xdg / "kaggle"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _read_token(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return text or None
    except (OSError, UnicodeDecodeError):
        return None


def _is_file(text: str) -> bool:
    try:  # KAGGLE_API_TOKEN holds a token or a path to one; a long token is not a valid path
        return Path(text).is_file()
    except OSError:
        return False


def find_credentials() -> Credentials:
    """Look where the client looks; collect every secret value we can see, for scrubbing."""
    creds = Credentials()
    secrets: list[str] = []
    users: set[str] = set()

    env_token = os.environ.get("KAGGLE_API_TOKEN")
    if env_token:
        token = _read_token(Path(env_token)) if _is_file(env_token) else env_token
        if token:
            secrets.append(token)
            creds.source = creds.source or "KAGGLE_API_TOKEN"
    home_kaggle = Path(os.path.expanduser("~")) / ".kaggle"  # kagglesdk reads tokens only from here
    for name in ("access_token", "access_token.txt"):
        token = _read_token(home_kaggle / name)
        if token:
            secrets.append(token)
            creds.source = creds.source or str(home_kaggle / name)
    oauth = _read_json(home_kaggle / "credentials.json")  # the client's OAuth login (`kaggle auth login`)
    for k in ("refresh_token", "access_token"):
        if oauth.get(k):
            secrets.append(str(oauth[k]))
            creds.source = creds.source or str(home_kaggle / "credentials.json")
    if oauth.get("username"):
        creds.username = str(oauth["username"])
        users.add(creds.username)
    for d in _config_dirs():
        data = _read_json(d / "kaggle.json")
        if data.get("key"):
            secrets.append(str(data["key"]))
            if data.get("username"):
                creds.username = str(data["username"])
                users.add(creds.username)
                creds.source = creds.source or str(d / "kaggle.json")
            break
    # Environment variables override the file, as in the client.
    if os.environ.get("KAGGLE_KEY"):
        secrets.append(os.environ["KAGGLE_KEY"])
        if os.environ.get("KAGGLE_USERNAME"):
            creds.source = "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_USERNAME"):
        creds.username = os.environ["KAGGLE_USERNAME"]
        users.add(creds.username)

    # HTTP Basic auth carries base64("user:key"); scrub that spelling too.
    secrets += [base64.b64encode(f"{user}:{key}".encode()).decode() for user in users for key in list(secrets)]
    creds.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
    return creds


def scrub(text: str, secrets: list[str]) -> str:
    """Replace every known secret value in `text` (longest first, so no partial leftovers)."""
    for s in secrets:
        text = text.replace(s, "***")
    return text
