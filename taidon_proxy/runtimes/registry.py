"""Chooses an instance runtime by kind, importing its module only when it is asked for."""

from __future__ import annotations

import importlib
from typing import Any

from taidon_proxy.runtimes.base import InstanceRuntime, RuntimeError_

# kind -> (module, class). Add a runtime here; its module is imported on first use only.
RUNTIMES: dict[str, tuple[str, str]] = {
    "process": ("taidon_proxy.runtimes.process", "ProcessRuntime"),
    "docker": ("taidon_proxy.runtimes.docker", "DockerRuntime"),
    "kubernetes": ("taidon_proxy.runtimes.kubernetes", "KubernetesRuntime"),
}


def open_runtime(kind: str, **options: Any) -> InstanceRuntime:
    """Build the runtime `kind` with its constructor's keyword options."""
    try:
        module_name, class_name = RUNTIMES[kind]
    except KeyError:
        raise RuntimeError_(
            f"unknown runtime kind {kind!r}; known: {', '.join(sorted(RUNTIMES))}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    runtime = cls(**options)
    if not isinstance(runtime, InstanceRuntime):
        raise TypeError(f"{module_name}.{class_name} does not implement InstanceRuntime")
    return runtime
