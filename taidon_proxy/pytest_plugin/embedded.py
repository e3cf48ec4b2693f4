"""An embedded proxy for one test session: `sqlrs serve` in a subprocess on loopback ports."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from taidon_proxy.admin.auth import read_token
from taidon_proxy.config_load import load_config
from taidon_proxy.errors import ConfigError
from taidon_proxy.pytest_plugin.endpoint import (
    LABEL_PREFIX,
    Endpoint,
    TaidonPluginError,
    call,
    healthy,
)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
LOG_TAIL = 4000
LOG_NAME = "pytest-serve.log"
PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> Callable[[], None]:
    """In the child before exec: SIGTERM when the pytest process dies, even by SIGKILL (the
    proxy then stops as on any SIGTERM, its instances with it)."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def setup() -> None:  # only system calls between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


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
        self.log_path = cfg.store / LOG_NAME  # kept after the run, replaced by the next one
        argv = [sys.executable, "-m", "taidon_proxy.cli", "--config", name, "serve"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                # Only prctl and getppid run in the child before exec (xdist has threads).
                preexec_fn=_stop_with_parent(os.getpid()),  # noqa: PLW1509
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
        self.purge_leftovers(self.endpoint)
        return self.endpoint

    @staticmethod
    def purge_leftovers(endpoint: Endpoint) -> None:
        """Test databases a killed run left in the store (a stopped proxy keeps shared clones):
        this proxy is ours alone, so every `pytest-` label on it is a leftover."""
        for inst in call(endpoint.admin_url, endpoint.token, "GET", "/v1/instances"):
            if str(inst.get("label") or "").startswith(LABEL_PREFIX):
                with contextlib.suppress(TaidonPluginError):  # gone already: fine
                    call(
                        endpoint.admin_url, endpoint.token, "DELETE", f"/v1/instances/{inst['id']}"
                    )

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
