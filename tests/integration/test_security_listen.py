"""Binding off loopback needs SCRAM: an open port must not hand out superuser sessions."""

from __future__ import annotations

import pytest

from taidon_proxy.errors import ConfigError
from tests.conftest import ProxyFactory, demo_recipe

pytestmark = pytest.mark.integration


async def test_non_loopback_listen_with_trust_is_refused(make_proxy: ProxyFactory) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        await make_proxy({"demo": demo_recipe()}, listen="0.0.0.0:0")
