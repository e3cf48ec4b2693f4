"""instances.retention: a duration, 0 / never / off to keep stopped shared clones forever."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.config_load import parse_config
from taidon_proxy.errors import ConfigError

pytestmark = pytest.mark.unit
SOURCE = Path("/nonexistent/taidon.yaml")  # only named in errors; nothing is read


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("", 7 * 86400.0), ("retention: 36h", 129600.0), ("retention: 0", 0.0),
     ("retention: never", 0.0), ("retention: off", 0.0), ("retention: 90", 90.0)],
)  # fmt: skip
def test_retention_values(text: str, seconds: float) -> None:
    cfg = parse_config(f"instances:\n  idle_ttl: 1m\n  {text}\n", source=SOURCE)
    assert cfg.instances.retention == seconds


def test_a_bad_retention_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"instances\.retention"):
        parse_config("instances:\n  retention: soon\n", source=SOURCE)
