"""The proxy tokens `sqlrs login` obtained, per admin address, in the CLI's config directory.

One JSON file, 0600 from its first byte ($TAIDON_CONFIG_DIR, else $XDG_CONFIG_HOME/taidon,
else ~/.config/taidon). Later commands send the stored token for the proxy they talk to.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

FILE = "credentials.json"


def config_dir() -> Path:
    given = os.environ.get("TAIDON_CONFIG_DIR")
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "taidon"


def path() -> Path:
    return config_dir() / FILE


def _read() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path().read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


def _write(data: dict[str, Any]) -> None:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, target)


def get(base: str) -> dict[str, Any] | None:
    """The stored login for the proxy at `base` (http://host:port), unless it has expired."""
    entry = _read().get(base)
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    if float(entry.get("expires", 0)) <= time.time():
        return None
    return entry


def put(base: str, entry: dict[str, Any]) -> None:
    data = _read()
    data[base] = entry
    _write(data)


def drop(base: str) -> dict[str, Any] | None:
    data = _read()
    entry = data.pop(base, None)
    if entry is not None:
        _write(data)
    return entry if isinstance(entry, dict) else None
