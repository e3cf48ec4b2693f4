"""The controller's settings from its environment: defaults, quotas, and precise errors."""

from __future__ import annotations

import pytest

from taidon_proxy.k8s.api import KubeError
from taidon_proxy.k8s.controller import settings_from_env

pytestmark = pytest.mark.unit


def test_settings_from_env() -> None:
    s = settings_from_env({
        "TAIDON_IMAGE": "reg/pg:15", "TAIDON_TEAM_QUOTAS": "a=3, b=0",
        "TAIDON_DEFAULT_TEAM_QUOTA": "5", "TAIDON_LEASE_SECONDS": "45",
        "TAIDON_STORAGE_CLASS": "csi-rbd",
    })  # fmt: skip
    assert s.image.image == "reg/pg:15" and (s.image.uid, s.image.gid) == (100, 102)
    assert s.team_quotas == {"a": 3, "b": 0}
    assert (s.quota("a"), s.quota("b"), s.quota("c")) == (3, 0, 5)
    assert s.lease_seconds == 45 and s.interval == 10
    assert s.storage_class == "csi-rbd" and s.snapshot_class is None
    assert settings_from_env({"TAIDON_IMAGE": "x"}).quota("any") is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TAIDON_IMAGE"),
        ({"TAIDON_TEAM_QUOTAS": "a:3"}, "expected team=N"),
        ({"TAIDON_DEFAULT_TEAM_QUOTA": "-1"}, "whole number"),
        ({"TAIDON_LEASE_SECONDS": "soon"}, "TAIDON_LEASE_SECONDS must be a number"),
        ({"TAIDON_RECONCILE_SECONDS": "0"}, "must be positive"),
        ({"TAIDON_IMAGE_UID": "pg"}, "must be numbers"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(KubeError, match=message):
        settings_from_env({"TAIDON_IMAGE": "x", **env} if env else env)
