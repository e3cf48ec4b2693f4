"""An embedded proxy for one test session: `sqlrs serve` in a subprocess on loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from taidon_proxy.admin.auth import read_token
from taidon_proxy.config import load_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.pytest_plugin.endpoint import Endpoint, TaidonPluginError, healthy

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
LOG_TAIL = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedProxy:
    """`sqlrs serve` on the user's config (its recipes and store, so states built by earlier
    runs are reused) with its own loopback ports and a warm pool for new test databases.

    The derived config is written beside the user's file (a hidden one, removed at stop):
    relative paths and the directory recipes run in stay those of the user's file.
    """

    def __init__(self, config_path: Path, warm: int) -> None:
        self.config_path = config_path
        self.warm = warm
        self.proc: subprocess.Popen[bytes] | None = None
        self.derived: Path | None = None
        self.log_path: Path | None = None
        self.endpoint: Endpoint | None = None

    def start(self) -> Endpoint:
        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            raise TaidonPluginError(f"taidon: {e.message}") from None
        data: dict[str, Any] = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        admin_port = free_port()
        data["listen"] = "127.0.0.1:0"
        data["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
        instances = dict(data.get("instances") or {})
        instances["warm_labels"] = self.warm
        data["instances"] = instances
        fd, name = tempfile.mkstemp(
            prefix=f".taidon-pytest-{os.getpid()}-", suffix=".yaml", dir=self.config_path.parent
        )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f)
        self.derived = Path(name)
        cfg.store.mkdir(parents=True, exist_ok=True)
        log_fd, log_name = tempfile.mkstemp(prefix="taidon-pytest-", suffix=".log")
        self.log_path = Path(log_name)
        argv = [sys.executable, "-m", "taidon_proxy.cli", "--config", name, "serve"]
        with os.fdopen(log_fd, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        url = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + START_TIMEOUT
        while not healthy(url):
            status = self.proc.poll()
            if status is not None:
                log_text = self.log_tail()
                self.stop()
                raise TaidonPluginError(
                    f"taidon: the embedded proxy exited at start (status {status}):\n{log_text}"
                )
            if time.monotonic() > deadline:
                log_text = self.log_tail()
                self.stop()
                raise TaidonPluginError(
                    f"taidon: the embedded proxy did not come up in {START_TIMEOUT:.0f}s:\n"
                    f"{log_text}"
                )
            time.sleep(0.05)
        self.endpoint = Endpoint.discover(url, read_token(cfg.store))
        return self.endpoint

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-LOG_TAIL:]

    def stop(self) -> None:
        """SIGTERM (the proxy stops its instances), SIGKILL of the group if it hangs."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self.derived is not None:
            self.derived.unlink(missing_ok=True)
            self.derived = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
