"""Server and initdb settings every runtime shares: throwaway-fast defaults and what is reserved."""

from __future__ import annotations

import re
from collections.abc import Mapping

from taidon_proxy.runtimes.base import RuntimeError_

# Instances are throwaway: durability is the snapshot's job, not the server's.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_wal_senders": "0",
    "wal_level": "minimal",
    "logging_collector": "off",
}
# What keeps an instance private and findable: never taken from callers.
RESERVED_SETTINGS = frozenset(
    {"listen_addresses", "unix_socket_directories", "port", "data_directory", "config_file"}
)
INITDB_KEYS = frozenset({"encoding", "locale", "data_checksums", "wal_segsize"})
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def server_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """The fast defaults overlaid with the caller's settings, after checking each one."""
    for key, value in settings.items():
        if not _GUC_NAME.fullmatch(key):
            raise RuntimeError_(f"invalid setting name {key!r}")
        if key.lower() in RESERVED_SETTINGS:
            raise RuntimeError_(f"setting {key!r} is managed by the runtime")
        if "\0" in value:
            raise RuntimeError_(f"invalid value for setting {key!r}")
    return {**FAST_SETTINGS, **settings}


def initdb_options(settings: Mapping[str, str]) -> list[str]:
    """initdb flags for the settings (defaults: locale C, UTF8: no dependence on the host)."""
    unknown = set(settings) - INITDB_KEYS
    if unknown:
        raise RuntimeError_(
            f"unknown initdb settings {sorted(unknown)}; known: {sorted(INITDB_KEYS)}"
        )
    opts = [
        "--no-sync",
        "--no-instructions",
        f"--locale={settings.get('locale', 'C')}",
        f"--encoding={settings.get('encoding', 'UTF8')}",
    ]
    if settings.get("data_checksums", "off").strip().lower() in ("1", "on", "true", "yes"):
        opts.append("--data-checksums")
    if "wal_segsize" in settings:
        size = settings["wal_segsize"]
        if not size.isdigit() or int(size) not in {2**i for i in range(11)}:
            raise RuntimeError_(f"wal_segsize must be a power of 2 from 1 to 1024 MB: {size!r}")
        opts.append(f"--wal-segsize={size}")
    return opts
