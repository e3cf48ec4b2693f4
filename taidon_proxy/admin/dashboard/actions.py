"""What the signed-in principal may do from a page: each button is shown only if the admin
API would let its call through (`admin.permissions.permitted`, the one decision)."""

from __future__ import annotations

from dataclasses import dataclass

from taidon_proxy.admin.permissions import may_see, owns, permitted
from taidon_proxy.services import Services
from taidon_proxy.services.access import Principal


@dataclass(frozen=True)
class Actions:
    s: Services
    principal: Principal

    def _may(self, method: str, path: str, alias: str | None, own: bool = False) -> bool:
        return permitted(self.s, self.principal, method, path, alias, own=own)

    def sees(self, alias: str | None) -> bool:
        return may_see(self.s, self.principal, alias)

    def prepare(self, alias: str) -> bool:
        return self._may("POST", "/v1/aliases/{alias}/prepare", alias)

    def pin(self, alias: str | None) -> bool:  # pin and unpin
        return self._may("POST", "/v1/states/{ref}/pin", alias)

    def remove(self, alias: str | None) -> bool:
        return self._may("DELETE", "/v1/states/{ref}", alias)

    def reset(self, alias: str | None) -> bool:
        return alias is not None and self._may("POST", "/v1/aliases/{alias}/reset", alias)

    def stop(self, alias: str | None, instance_id: str) -> bool:
        own = owns(self.s, self.principal, instance_id)
        return self._may("DELETE", "/v1/instances/{ref}", alias, own=own)

    def snapshot(self, alias: str | None) -> bool:
        return self._may("POST", "/v1/snapshots", alias)

    def drain(self) -> bool:
        return self._may("POST", "/v1/drain", None)
