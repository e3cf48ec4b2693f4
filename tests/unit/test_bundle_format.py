"""State bundles' bytes: round trip of a data directory, and each kind of bad bundle refused
with its own check and message (no server: a directory shaped like a data directory)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from taidon_proxy.store.bundle import BundleError, Manifest, read_manifest, verify
from taidon_proxy.store.bundle.content import (
    SKIPPABLE_MAGIC,
    extract,
    manifest_frame,
    measure,
    write_bundle,
)
from taidon_proxy.store.bundle.manifest import Content, Engine, Link, check_engine
from taidon_proxy.store.ids import initdb_state_id, step_state_id

pytestmark = pytest.mark.unit

SETTINGS = {"encoding": "UTF8", "locale": "C.UTF-8", "wal_segsize": "1"}


def chain_for(version: str, steps: list[tuple[str, str, str]]) -> list[Link]:
    root = initdb_state_id(version, "host", SETTINGS)
    out = [Link(id=root, kind="initdb", label="initdb")]
    for kind, step_hash, label in steps:
        sid = step_state_id(out[-1].id, kind, step_hash)
        out.append(Link(id=sid, parent=out[-1].id, kind=kind, step_hash=step_hash, label=label))
    return out


def make_state(tmp: Path, major: str = "15") -> Path:
    state = tmp / "state"
    pgdata = state / "pgdata"
    (pgdata / "base" / "1").mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text(f"{major}\n")
    (pgdata / "base" / "1" / "1259").write_bytes(bytes(range(256)) * 64)
    (pgdata / "postgresql.conf").write_text("port = 5432\n")
    pgdata.chmod(0o700)
    return state


def manifest_for(state: Path, version: str = "15.8", **over: object) -> Manifest:
    sha, size, files = measure(state)
    chain = chain_for(version, [("root", "r" * 64, "database shop"), ("psql", "a" * 64, "a.sql")])
    fields: dict[str, object] = {
        "state": chain[-1].id,
        "alias": "shop",
        "chain": chain,
        "engine": Engine(
            version=version, major=int(version.split(".", maxsplit=1)[0]), source="host"
        ),
        "initdb_settings": SETTINGS,
        "backend": "copy",
        "clean": True,
        "created": time.time(),
        "exported_at": time.time(),
        "exported_by": "taidon-proxy test",
        "content": Content(sha256=sha, size=size, files=files),
    }
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def bundle_bytes(state: Path, manifest: Manifest) -> bytes:
    out = io.BytesIO()
    write_bundle(manifest, state, out)
    return out.getvalue()


def with_manifest(data: bytes, raw: bytes) -> bytes:
    """The same data frame behind another manifest."""
    _, length = struct.unpack("<II", data[:8])
    return manifest_frame(raw) + data[8 + length :]


def refused(data: bytes, dest: Path | None = None) -> BundleError:
    with pytest.raises(BundleError) as info:
        src = io.BytesIO(data)
        m = read_manifest(src)
        if dest is None:
            verify(io.BytesIO(data))
        else:
            extract(m, src, dest)
    return info.value


def test_round_trip_keeps_every_byte_and_mode(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    m = manifest_for(state)
    data = bundle_bytes(state, m)
    assert verify(io.BytesIO(data)) == m
    src = io.BytesIO(data)
    assert read_manifest(src) == m
    dest = tmp_path / "out"
    dest.mkdir()
    extract(m, src, dest)
    for rel in ("PG_VERSION", "base/1/1259", "postgresql.conf"):
        assert (dest / "pgdata" / rel).read_bytes() == (state / "pgdata" / rel).read_bytes()
    assert (dest / "pgdata").stat().st_mode & 0o777 == 0o700
    assert measure(dest) == (m.content.sha256, m.content.size, m.content.files)


def test_a_flipped_byte_in_the_data_is_refused(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    data = bytearray(bundle_bytes(state, manifest_for(state)))
    data[-20] ^= 0x01
    e = refused(bytes(data))
    assert e.check == "content"
    assert "corrupt" in e.message or "checksum" in e.message


def test_a_truncated_bundle_is_refused_at_every_cut(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    data = bundle_bytes(state, manifest_for(state))
    _, length = struct.unpack("<II", data[:8])
    assert refused(data[:5]).message == "truncated: the file ends inside the manifest header"
    assert refused(data[: 8 + length // 2]).message.startswith(
        "truncated: the file ends inside the manifest"
    )
    for cut in (8 + length + 10, len(data) - 4, len(data) - 1):
        e = refused(data[:cut], tmp_path / f"cut{cut}")
        assert e.check == "truncated", (cut, e.message)
        assert "truncated: the file ends inside the data" in e.message
    assert refused(b"").message == "not a state bundle: the file is empty"
    assert refused(b"PK\x03\x04" + b"\0" * 20).message.startswith("not a state bundle")


def test_a_manifest_whose_id_does_not_follow_from_its_chain(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    m = manifest_for(state)
    data = bundle_bytes(state, m)
    doc = json.loads(m.dump())
    doc["chain"][-1]["step_hash"] = "b" * 64  # the step hash of another file: id unchanged
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert e.check == "chain"
    assert "link 3 (a.sql) is listed as" in e.message and "give" in e.message
    doc = json.loads(m.dump())
    doc["state"] = "c" * 64
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert e.message == f"the chain ends at {m.state[:12]}, not at the bundle's state cccccccccccc"
    doc = json.loads(m.dump())
    doc["initdb_settings"]["locale"] = "de_DE.UTF-8"
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert e.check == "chain" and "does not follow from engine 15.8 (host)" in e.message


def test_a_consistent_manifest_with_a_tampered_checksum(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    m = manifest_for(state)
    data = bundle_bytes(state, m)
    doc = json.loads(m.dump())
    doc["content"]["sha256"] = "0" * 64
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert e.check == "content" and e.message.startswith("checksum mismatch")


def test_another_postgres_major_is_refused_by_name(tmp_path: Path) -> None:
    state = make_state(tmp_path, major="16")
    m = manifest_for(state, version="16.4")
    data = bundle_bytes(state, m)
    parsed = read_manifest(io.BytesIO(data))  # a consistent Postgres 16 bundle
    with pytest.raises(BundleError) as info:
        check_engine(parsed, 15, "15.8")
    assert info.value.check == "engine"
    assert info.value.message == (
        "the bundle holds a Postgres 16 state (built with 16.4); this proxy runs Postgres 15 (15.8)"
    )


def test_bad_manifests_name_the_field(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    data = bundle_bytes(state, manifest_for(state))
    assert refused(with_manifest(data, b"{not json")).message == "the manifest is not valid JSON"
    e = refused(with_manifest(data, b'{"format": "taidon-state-bundle", "version": 9}'))
    assert e.message.startswith("unknown bundle format version 9")
    doc = json.loads(manifest_for(state).dump())
    doc["chain"][0]["id"] = "xyz"
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert e.check == "manifest" and e.message.startswith("manifest field chain.0.id:")
    huge = struct.pack("<II", SKIPPABLE_MAGIC, 2**31)
    assert "a bundle's is at most" in refused(huge).message


def test_entries_outside_pgdata_are_refused(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    m = manifest_for(state)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    payload = raw.getvalue()
    m2 = m.model_copy(
        update={
            "content": Content(
                sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), files=1
            )
        }
    )
    data = manifest_frame(m2.dump())
    data += zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    dest = tmp_path / "dest"
    dest.mkdir()
    e = refused(data, dest)
    assert e.message == "the data holds '../escape', outside pgdata/"
    assert not (tmp_path / "escape").exists()


def test_data_larger_than_the_manifest_says_is_cut_off(tmp_path: Path) -> None:
    """A small bundle that expands to 256 MiB is refused once it passes the stated size."""
    state = make_state(tmp_path)
    m = manifest_for(state)
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(b"\0" * (256 * 2**20))
    assert len(bomb) < 2**17
    data = manifest_frame(m.dump()) + bomb
    e = refused(data)
    assert e.message == f"the data is larger than the manifest's {m.content.size} bytes"


def test_a_changed_byte_in_the_manifest_is_refused(tmp_path: Path) -> None:
    """Labels, alias and provenance are no part of any id: the manifest's checksum covers them."""
    state = make_state(tmp_path)
    data = bundle_bytes(state, manifest_for(state))
    at = data.index(b"a.sql")
    damaged = data[:at] + b"b" + data[at + 1 :]
    e = refused(damaged)
    assert (e.check, e.message) == (
        "manifest",
        "the manifest is damaged: it does not match its checksum",
    )


def test_provenance_travels_in_the_manifest_and_must_name_its_chain(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    plain = manifest_for(state)
    assert "provenance" not in json.loads(plain.dump())  # as bundles written before it
    assert verify(io.BytesIO(bundle_bytes(state, plain))).provenance is None
    records = {plain.state: {"tool": "psql", "files": [{"path": "a.sql", "blob": "0" * 40}]}}
    m = manifest_for(state, provenance=records)
    data = bundle_bytes(state, m)
    assert verify(io.BytesIO(data)).provenance == records
    doc = json.loads(m.dump())
    doc["provenance"]["e" * 64] = {"tool": "psql"}
    e = refused(with_manifest(data, json.dumps(doc).encode()))
    assert (e.check, e.message) == (
        "manifest", "the manifest's provenance names state eeeeeeeeeeee, not in its chain"
    )  # fmt: skip
