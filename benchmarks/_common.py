"""Benchmark-only helpers: a `sqlrs serve` subprocess, PgBouncer, pgbench runs, /proc readings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taidon_proxy.app import default_run_dir

ROOT = Path(__file__).resolve().parents[1]
SQLRS = ROOT / ".venv" / "bin" / "sqlrs"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WAIT_S = 120.0


def need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: instances and PgBouncer run as the postgres user")


def make_dir(prefix: str = "taidon-bench-") -> Path:
    """A dir under /tmp that the postgres user can traverse (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], limit_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {limit_s:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    """Signal one process we started, by pid; SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --- /proc readings ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- the proxy under test ---------------------------------------------------------------------


@dataclass
class ProxyProcess:
    """`sqlrs --config X serve` (uvloop) in a subprocess, with its admin API."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    store: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def dsn(self, database: str, user: str = PG_USER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def admin(self, path: str) -> Any:
        token = (self.store / "admin.token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def metric(self, name: str) -> float:
        """One sample of the proxy's Prometheus text (`name` includes its labels), or 0."""
        token = (self.store / "admin.token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/metrics",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def instances(self) -> list[dict[str, Any]]:
        data = self.admin("/v1/instances")
        return list(data)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def proxy_process(
    work: Path,
    databases: dict[str, Any],
    *,
    store: Path | None = None,
    backend: str = "copy",
    extra: dict[str, Any] | None = None,
    log_level: str = "info",
    loop: str = "uvloop",
) -> Iterator[ProxyProcess]:
    """Start the proxy on free loopback ports; stop it (SIGINT, by pid) on exit."""
    port, admin_port = free_port(), free_port()
    store = store or work / "store"
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "store": str(store),
        "snapshot": {"backend": backend},
        "runtime": {"kind": "process"},
        "auth": {"method": "trust"},
        "instances": {"idle_ttl": "30m", "max": 50},
        "databases": databases,
        **(extra or {}),
    }
    cfg = work / "taidon.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = work / "proxy.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(SQLRS), "--config", str(cfg), "serve", "--log-level", log_level, "--loop", loop],
            stdout=log, stderr=subprocess.STDOUT, cwd=work,
        )  # fmt: skip
    pp = ProxyProcess(proc, port, admin_port, store, log_path)
    ok = False
    try:
        wait_port(port, proc)
        wait_port(admin_port, proc)
        yield pp
        ok = True
    finally:
        stop_process(proc)
        if not ok:
            print("--- proxy log (tail) ---\n" + pp.log_tail(), file=sys.stderr)


def instance_socket_dir(pp: ProxyProcess, key: str) -> Path:
    """The unix socket dir of the running instance `key` (alias:label), found from the admin
    API's instance id and the process runtime's run dir (one dir per instance id)."""
    for inst in pp.instances():
        if inst["key"] == key:
            cand: Path = default_run_dir(pp.store) / str(inst["id"])
            if (cand / ".s.PGSQL.5432").exists():
                return cand
    raise RuntimeError(f"no running instance {key!r}")


# --- PgBouncer --------------------------------------------------------------------------------


@contextlib.contextmanager
def pgbouncer(work: Path, socket_dir: Path, dbname: str, pool_size: int = 20) -> Iterator[int]:
    """PgBouncer in session mode on loopback TCP, its server side on the instance's socket."""
    d = work / "pgbouncer"
    d.mkdir()
    port = free_port()
    (d / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
    (d / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{dbname} = host={socket_dir} port=5432 dbname={dbname} user={PG_USER}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {d / 'userlist.txt'}\n"
        f"pool_mode = session\ndefault_pool_size = {pool_size}\nmax_client_conn = 1000\n"
        f"logfile = {d / 'pgbouncer.log'}\npidfile = {d / 'pgbouncer.pid'}\n"
    )
    shutil.chown(d, PG_USER)
    for f in d.iterdir():
        shutil.chown(f, PG_USER)
    # setpriv execs pgbouncer itself, so proc.pid is PgBouncer's pid (for CPU readings).
    uid = int(subprocess.run(["id", "-u", PG_USER], capture_output=True, check=True).stdout)
    gid = int(subprocess.run(["id", "-g", PG_USER], capture_output=True, check=True).stdout)
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
         "pgbouncer", str(d / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ok = False
    try:
        wait_port(port, proc)
        bouncer_pid[port] = proc.pid
        yield port
        ok = True
    finally:
        stop_process(proc, signal.SIGINT)
        bouncer_pid.pop(port, None)
        if not ok:
            log = d / "pgbouncer.log"
            print("--- pgbouncer log ---\n" + (log.read_text() if log.exists() else ""))


bouncer_pid: dict[int, int] = {}  # listen port -> pid of the PgBouncer started on it


# --- pgbench ----------------------------------------------------------------------------------

# pgbench -C reports "including reconnection times" instead.
_TPS = re.compile(r"tps = ([0-9.]+) \((?:without initial |including re)connection times?\)")
_TXNS = re.compile(r"number of transactions actually processed: (\d+)")


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    cpu_s: float  # CPU of the watched middle process (proxy or PgBouncer) during the run

    @property
    def cpu_us_per_tx(self) -> float:
        return self.cpu_s / max(self.transactions, 1) * 1e6


def run_pgbench(
    conn: Sequence[str], *, clients: int, seconds: int, watch_pid: int | None,
    args: Sequence[str] = ("-S",),
) -> PgbenchResult:  # fmt: skip
    """pgbench as root with `conn` (-h/-p/-U/dbname args); CPU of watch_pid sampled around it."""
    argv = ["pgbench", "-n", *args, "-c", str(clients), "-j", "2", "-T", str(seconds), *conn]
    cpu0 = cpu_seconds(watch_pid) if watch_pid else 0.0
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 120)
    cpu1 = cpu_seconds(watch_pid) if watch_pid else 0.0
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr.strip()[-2000:]}")
    tps, txns = _TPS.search(out.stdout), _TXNS.search(out.stdout)
    assert tps is not None and txns is not None, out.stdout
    return PgbenchResult(float(tps.group(1)), int(txns.group(1)), cpu1 - cpu0)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
