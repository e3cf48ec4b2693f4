"""The short fuzz run of the protocol core (the long one is `python -m fuzz.pgwire`)."""

from __future__ import annotations

import random

import pytest

from fuzz import pgwire as fuzz
from taidon_proxy.pgwire.errors import RemoteProtocolError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_only_protocol_errors_come_out(target: str) -> None:
    result = fuzz.run(target, 7000, seed=20261203)
    # Both kinds of input occur: refused ones, and ones the machine goes through.
    assert 0 < result.refused < result.inputs
    assert result.rss_growth_kib < 64 * 1024


def test_a_defect_is_reported_with_its_input(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(rng: random.Random) -> None:
        if rng.random() < 0.5:
            raise RemoteProtocolError("refused")
        raise KeyError("ours")

    monkeypatch.setitem(fuzz.TARGETS, "broken", broken)
    with pytest.raises(fuzz.Defect, match=r"broken input \d+ \(seed 3\): KeyError"):
        fuzz.run("broken", 100, seed=3)
