"""A small asyncio client of the Kubernetes API: create, get, list, merge-patch, delete."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from taidon_proxy.runtimes.base import RuntimeError_

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 30.0


class KubeError(RuntimeError_):
    """The API server refused a request; the message names the request and its answer."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AlreadyExists(KubeError):
    pass


@dataclass(frozen=True)
class Kind:
    """A resource type: where its objects live in the API."""

    group: str  # "" for the core API
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = (
            f"{root}/namespaces/{namespace}/{self.plural}" if namespace else f"{root}/{self.plural}"
        )
        if name is not None:
            path += f"/{name}"
        if sub is not None:
            path += f"/{sub}"
        return path


PODS = Kind("", "v1", "pods", "Pod")
PVCS = Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
SECRETS = Kind("", "v1", "secrets", "Secret")
VOLUME_SNAPSHOTS = Kind("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot")
INSTANCES = Kind("taidon.dev", "v1alpha1", "taidoninstances", "TaidonInstance")
STATES = Kind("taidon.dev", "v1alpha1", "taidonstates", "TaidonState")


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class KubeApi:
    """One HTTP session to one API server, as a service account or with an explicit URL."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        keepalive: bool = True,
    ):
        self.server = server.rstrip("/")
        self.keepalive = keepalive
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file)
        if not server.startswith("https://"):
            self._ssl = False
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, its token and CA."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError(
                "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset): "
                "give the runtime an api_url"
            )
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token=token, ca_file=str(SERVICE_ACCOUNT / "ca.crt"))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                connector=aiohttp.TCPConnector(force_close=not self.keepalive),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with (
                asyncio.timeout(REQUEST_TIMEOUT),
                self._http().request(
                    method, self.server + path, json=body, headers=headers, ssl=self._ssl
                ) as resp,
            ):
                data = await resp.json(content_type=None) if resp.content_length != 0 else None
                return resp.status, data
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubeError(f"{method} {path}: no answer from the API server ({exc})") from exc

    @staticmethod
    def _check(method: str, path: str, status: int, data: Any) -> Any:
        if 200 <= status < 300:
            return data
        message = data.get("message") if isinstance(data, dict) else None
        text = f"{method} {path}: HTTP {status}" + (f": {message}" if message else "")
        if status == 409:
            raise AlreadyExists(text, status=status)
        raise KubeError(text, status=status)

    async def create(self, kind: Kind, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        path = kind.path(namespace)
        status, data = await self._call("POST", path, dict(body))
        return dict(self._check("POST", path, status, data))

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        path = kind.path(namespace, name)
        status, data = await self._call("GET", path)
        return None if status == 404 else dict(self._check("GET", path, status, data))

    async def list(
        self, kind: Kind, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a namespace (None: every namespace) with all of `labels`."""
        path = kind.path(namespace)
        query = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        status, data = await self._call("GET", path + (f"?labelSelector={query}" if query else ""))
        items = self._check("GET", path, status, data).get("items") or []
        # The server filters by label; a server that does not is filtered here as well.
        return [dict(item) for item in items if matches(item, labels or {})]

    async def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        """A JSON merge patch of the object (or its status subresource)."""
        path = kind.path(namespace, name, "status" if status else None)
        code, data = await self._call("PATCH", path, dict(body), "application/merge-patch+json")
        return dict(self._check("PATCH", path, code, data))

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete; False when it was gone already."""
        path = kind.path(namespace, name)
        status, data = await self._call("DELETE", path)
        if status == 404:
            return False
        self._check("DELETE", path, status, data)
        return True
