"""What a session needs from the proxy (and nothing else): the session never sees the server."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.instances.roles import LoginRoles
from taidon_proxy.net.auth import Authenticator
from taidon_proxy.net.cancel import CancelKeys
from taidon_proxy.net.maintenance import Maintenance
from taidon_proxy.net.offload import NativeRelay
from taidon_proxy.net.serverpool import ServerPool
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.team import Team


@dataclass(frozen=True, eq=False)
class SessionContext:
    instances: InstanceManager
    auth: Authenticator
    tls: ssl.SSLContext | None
    keys: CancelKeys
    pool: ServerPool
    roles: LoginRoles
    relay: Callable[[], NativeRelay | None]  # the C relay thread, started on first use
    maintenance: Callable[[], Maintenance | None]
    team: Team | None  # the team server: principals, permissions, quotas (None: one user)
    # The session has ended (called once, with the session; the context does not know its type).
    closed: Callable[[object], None]
    audit: Audit  # each connection's record, at its end
