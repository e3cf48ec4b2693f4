"""Admin HTTP API of a running proxy: status, states, instances, jobs, cache, metrics."""

from taidon_proxy.admin.server import AdminServer

__all__ = ["AdminServer"]
