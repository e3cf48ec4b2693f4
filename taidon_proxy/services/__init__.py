"""The use-cases the edges call (admin API, CLI, network shell), one room above the machinery."""

from taidon_proxy.services.bundle import BackendInfo, Services
from taidon_proxy.services.errors import Refusal

__all__ = ["BackendInfo", "Refusal", "Services"]
