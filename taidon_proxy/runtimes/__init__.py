"""Instance runtimes: run a Postgres server per instance (process or docker)."""

from taidon_proxy.runtimes.base import (
    EngineInfo,
    InstanceHandle,
    InstanceRuntime,
    InstanceStartError,
    RuntimeCapabilities,
    RuntimeError_,
)
from taidon_proxy.runtimes.registry import open_runtime

__all__ = [
    "EngineInfo",
    "InstanceHandle",
    "InstanceRuntime",
    "InstanceStartError",
    "RuntimeCapabilities",
    "RuntimeError_",
    "open_runtime",
]
