"""The automatic warm pool's sizing: Little's law on the recent connect rate."""

from __future__ import annotations

import pytest

from taidon_proxy.instances.warmsizer import WarmSizer

pytestmark = pytest.mark.unit


def test_no_stream_no_spares() -> None:
    s = WarmSizer(4, window_s=30, min_arrivals=3)
    s.arrived("k", 0.0)
    s.arrived("k", 1.0)
    assert s.target("k", 1.0) == 0
    assert s.target("other", 1.0) == 0


def test_rate_times_start_time_plus_one() -> None:
    s = WarmSizer(10, window_s=30, min_arrivals=3)
    for t in range(11):  # 11 arrivals over 10 s: 1.1/s
        s.arrived("k", float(t))
    s.started("k", 0.35)  # plain copy: a start takes ~350 ms
    assert s.target("k", 10.0) == 2  # ceil(1.1 * 0.35) + 1
    s.started("k", 5.0)  # much slower starts move the estimate, weighted
    assert s.target("k", 10.0) == 3  # ceil(1.1 * (0.7*0.35 + 0.3*5)) + 1 = ceil(1.92) + 1


def test_ceiling_bounds_the_pool() -> None:
    s = WarmSizer(2, window_s=30, min_arrivals=3)
    for i in range(100):
        s.arrived("k", i * 0.01)  # 100/s
    s.started("k", 1.0)
    assert s.target("k", 1.0) == 2


def test_old_arrivals_leave_the_window_and_the_key_is_forgotten() -> None:
    s = WarmSizer(4, window_s=10, min_arrivals=3)
    for t in (0.0, 1.0, 2.0):
        s.arrived("k", t)
    assert s.target("k", 2.0) > 0
    assert not s.forget("k", 5.0)  # still within the window
    assert s.target("k", 11.5) == 0  # two of the three aged out
    assert s.forget("k", 12.5)
    assert s.target("k", 12.5) == 0
