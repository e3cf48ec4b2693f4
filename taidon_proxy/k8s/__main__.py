"""`python -m taidon_proxy.k8s`: the controller, in its pod, configured by TAIDON_* variables."""

from __future__ import annotations

import asyncio
import os
import sys

from taidon_proxy.k8s.api import KubeError
from taidon_proxy.k8s.controller import run, settings_from_env


def main() -> int:
    try:
        settings = settings_from_env(os.environ)
    except KubeError as exc:
        print(f"taidon controller: {exc.message}", file=sys.stderr)
        return 2
    namespaces = [n for n in os.environ.get("TAIDON_NAMESPACES", "").split(",") if n]
    liveness = os.environ.get("TAIDON_LIVENESS") or None  # e.g. http://0.0.0.0:8081/healthz
    asyncio.run(run(settings, namespaces=namespaces or None, liveness=liveness))
    return 0


if __name__ == "__main__":
    sys.exit(main())
