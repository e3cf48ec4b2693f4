"""TLS for client connections: a server context with the ALPN name Postgres 17 direct TLS wants."""

from __future__ import annotations

import ssl
from pathlib import Path

from taidon_proxy.errors import ConfigError

ALPN = "postgresql"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls: cannot load certificate {cert} / key {key}: {e}") from e
    ctx.set_alpn_protocols([ALPN])
    return ctx
