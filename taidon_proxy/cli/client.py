"""The admin API client the CLI uses: finds the proxy from the config, sends the token."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from taidon_proxy.admin.auth import read_token, token_path
from taidon_proxy.cli import credentials
from taidon_proxy.cli.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NO_PROXY,
    CliError,
    api_failure,
)
from taidon_proxy.config import Config
from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError

REQUEST_TIMEOUT = 120.0
STREAM_READ_TIMEOUT = 3600.0  # a build step may run long without an event
START_TIMEOUT = 60.0
COPY_CHUNK = 2**20


def load(config_path: Path, *, check: bool = True) -> Config:
    """The config, or a CLI error (exit 3); `check=False` skips checking the files it names."""
    try:
        return load_config(config_path, check=check)
    except ConfigError as e:
        hint = "create one with: sqlrs init" if not config_path.exists() else None
        raise CliError(e.message, EXIT_CONFIG, hint=hint) from None


def start_command(config_path: Path) -> str:
    return f"sqlrs --config {config_path} serve"


@dataclass
class AdminClient:
    config: Config
    config_path: Path
    base: str

    @classmethod
    def open(cls, config_path: Path, *, start: bool = False) -> AdminClient:
        """A client for the proxy this config describes; starts one in the background if asked.

        Only the schema is checked here: a recipe with a missing file must not keep the
        operator from reaching the proxy (the proxy reports it; `sqlrs config show` too).
        """
        cfg = load(config_path, check=False)
        if cfg.admin.listen is None:
            raise CliError(
                f"{config_path}: admin.listen is off, so the CLI cannot reach the proxy",
                EXIT_CONFIG,
                hint="set admin.listen (e.g. 127.0.0.1:55433) and restart the proxy",
            )
        client = cls(cfg, config_path, f"http://{cfg.admin.listen}")
        if not client.alive():
            if not start:
                raise client.not_running()
            client.start_background()
        return client

    def not_running(self) -> CliError:
        return CliError(
            f"no proxy is running at {self.config.admin.listen} (config {self.config_path});"
            f" start one with: {start_command(self.config_path)}, or pass --start",
            EXIT_NO_PROXY,
        )

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/v1/health", timeout=5) as r:
                return bool(r.status == 200)
        except (OSError, ValueError):
            return False

    def start_background(self) -> None:
        """`sqlrs serve` as a detached child; its log goes to <store>/serve.log."""
        store = self.config.store
        store.mkdir(parents=True, exist_ok=True)
        log_path = store / "serve.log"
        argv = [
            sys.executable,
            "-m",
            "taidon_proxy.cli",
            "--config",
            str(self.config_path),
            "serve",
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.alive():
                return
            if proc.poll() is not None:
                raise CliError(
                    f"the proxy exited at start (status {proc.returncode}); see {log_path}",
                    EXIT_FAILED,
                )
            time.sleep(0.2)
        raise CliError(f"the proxy did not come up in {START_TIMEOUT:.0f}s; see {log_path}")

    # --- requests -----------------------------------------------------------------------------

    def _token(self) -> str:
        given = os.environ.get("TAIDON_TOKEN", "").strip()  # a team member's own token
        if given:
            return given
        signed_in = credentials.get(self.base)  # from `sqlrs login`
        if signed_in is not None:
            return str(signed_in["token"])
        token = read_token(self.config.store)
        if token is None:
            path = token_path(self.config.store)
            why = "unreadable" if path.exists() else "missing"
            raise CliError(
                f"the admin token {path} is {why}",
                EXIT_CONFIG,
                hint="run the CLI as the user that runs the proxy" if why == "unreadable" else None,
            )
        return token

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        query: dict[str, Any] | None,
        bearer: str | None = "",
    ) -> urllib.request.Request:
        url = self.base + urllib.parse.quote(path, safe="/:")
        if query:
            url += "?" + urllib.parse.urlencode(
                {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in query.items()}
            )
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if bearer is not None:  # None: a public route (no credential at all)
            req.add_header("Authorization", f"Bearer {bearer or self._token()}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        return req

    def _open(self, req: urllib.request.Request, timeout: float) -> Any:
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                error = json.loads(raw).get("error", {})
            except ValueError:
                error = {"message": raw.decode(errors="replace")[:200]}
            raise api_failure(e.code, error) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError | FileNotFoundError):
                raise self.not_running() from None
            raise CliError(f"cannot reach the proxy at {self.base}: {e.reason}") from None

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        with self._open(self._request(method, path, body, query), REQUEST_TIMEOUT) as r:
            raw = r.read()
            if "json" in r.headers.get("Content-Type", ""):
                return json.loads(raw)
            return raw.decode()

    def call_as(self, bearer: str | None, method: str, path: str, body: Any = None) -> Any:
        """A request with this bearer (None: none, for the public sign-in routes)."""
        with self._open(self._request(method, path, body, None, bearer), REQUEST_TIMEOUT) as r:
            return json.loads(r.read())

    def get(self, path: str, **query: Any) -> Any:
        return self.call("GET", path, **query)

    def download(self, path: str, out: BinaryIO) -> dict[str, str]:
        """The response body into `out`, streamed; its headers. A cut stream is an error."""
        with self._open(self._request("GET", path, None, None), STREAM_READ_TIMEOUT) as r:
            try:
                while chunk := r.read(COPY_CHUNK):
                    out.write(chunk)
            except (http.client.IncompleteRead, OSError) as e:
                raise CliError(f"the proxy ended the download early ({e})") from None
            return dict(r.headers.items())

    def upload(self, path: str, src: BinaryIO, size: int, **query: Any) -> Any:
        """POST `size` bytes read from `src` as the body, streamed; the JSON answer."""
        req = self._request("POST", path, None, query)
        req.data = src  # urllib streams a file body in blocks
        req.add_header("Content-Type", "application/zstd")
        req.add_header("Content-Length", str(size))
        with self._open(req, STREAM_READ_TIMEOUT) as r:
            return json.loads(r.read())

    def stream(
        self, method: str, path: str, body: Any = None, **query: Any
    ) -> Iterator[dict[str, Any]]:
        """NDJSON lines as they arrive."""
        with self._open(self._request(method, path, body, query), STREAM_READ_TIMEOUT) as r:
            for line in r:
                if line.strip():
                    yield json.loads(line)
