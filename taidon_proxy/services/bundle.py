"""The services of one running proxy, handed to the edges as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

from taidon_proxy.config import Config
from taidon_proxy.instances.manager import InstanceManager
from taidon_proxy.instances.virtual import VirtualDatabases
from taidon_proxy.prepare.builder import StateBuilder
from taidon_proxy.runtimes.base import InstanceRuntime
from taidon_proxy.services.audit import Audit
from taidon_proxy.services.lifecycle import Lifecycle, Listener
from taidon_proxy.services.oidc import OidcLogin
from taidon_proxy.services.recipes import Recipes
from taidon_proxy.services.team import Team
from taidon_proxy.store.eviction import Evictor
from taidon_proxy.store.metadata_api import MetadataStore
from taidon_proxy.store.states import StateStore


@dataclass(frozen=True)
class BackendInfo:
    name: str
    reason: str  # why this backend (configured, detected, the store's), and where it put states


@dataclass(frozen=True)
class Services:
    """Built by `Proxy.open`; every field is set. Edges take what they need and nothing else."""

    lifecycle: Lifecycle  # the current config, reload, drain, stop
    meta: MetadataStore
    store: StateStore
    backend: BackendInfo
    runtime: InstanceRuntime
    builder: StateBuilder
    instances: InstanceManager
    virtual: VirtualDatabases
    evictor: Evictor
    recipes: Recipes
    listener: Listener
    audit: Audit  # the hash-chained record of connections, builds and admin actions
    team: Team  # principals, tokens, quotas (consulted only with teams in the config)
    oidc: OidcLogin  # sign-in through an OpenID provider (only with oidc: and teams:)

    @property
    def config(self) -> Config:
        """The config in force (a reload replaces it)."""
        return self.lifecycle.config
