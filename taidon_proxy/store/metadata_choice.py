"""Which metadata backend a config asks for: the store's SQLite file, or a shared Postgres."""

from __future__ import annotations

import socket
from pathlib import Path

from taidon_proxy.config import MetadataConfig
from taidon_proxy.store.metadata import Metadata
from taidon_proxy.store.metadata_api import MetadataStore
from taidon_proxy.store.metadata_pg import PgMetadata


def default_node(store: Path) -> str:
    """hostname:store: the same after a restart of the same gateway (a StatefulSet pod keeps
    its name and volume), different for two gateways on one machine."""
    return f"{socket.gethostname()}:{store.resolve()}"


def make_metadata(cfg: MetadataConfig, store: Path) -> MetadataStore:
    if cfg.kind == "postgres":
        assert cfg.dsn is not None  # the config's validator requires it
        return PgMetadata(
            cfg.dsn, cfg.node or default_node(store), connect_timeout=cfg.connect_timeout
        )
    return Metadata(store / "meta.sqlite")
