"""Hypothesis invariants of state bundles: any damage to a bundle (a changed byte, a cut, an
insertion) is refused with a BundleError, never another exception and never accepted, and
any file of garbage is refused the same way."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taidon_proxy.store.bundle import BundleError, verify
from taidon_proxy.store.bundle.content import extract
from taidon_proxy.store.bundle.content import read_manifest as read
from tests.unit.test_bundle_format import bundle_bytes, make_state, manifest_for

pytestmark = pytest.mark.property
SETTINGS = settings(
    deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_dir = Path(tempfile.mkdtemp(prefix="taidon-bundle-prop-"))
_state = make_state(_dir)
GOOD = bundle_bytes(_state, manifest_for(_state))


def refused(data: bytes) -> BundleError:
    with pytest.raises(BundleError) as info:
        verify(io.BytesIO(data))
    return info.value


@SETTINGS
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_any_changed_byte_is_refused(at: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[at] ^= xor
    refused(bytes(data))


@SETTINGS
@given(st.integers(0, len(GOOD) - 1))
def test_any_cut_is_refused(at: int) -> None:
    refused(GOOD[:at])


@SETTINGS
@given(st.integers(0, len(GOOD)), st.binary(min_size=1, max_size=64))
def test_any_insertion_is_refused(at: int, extra: bytes) -> None:
    refused(GOOD[:at] + extra + GOOD[at:])


@SETTINGS
@given(st.binary(max_size=4096))
def test_garbage_is_refused(data: bytes) -> None:
    refused(data)


@settings(deadline=None, max_examples=60)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_extracting_a_damaged_bundle_raises_only_bundle_errors(at: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[at] ^= xor
    with tempfile.TemporaryDirectory(dir=_dir) as dest, pytest.raises(BundleError):
        src = io.BytesIO(bytes(data))
        extract(read(src), src, Path(dest))
