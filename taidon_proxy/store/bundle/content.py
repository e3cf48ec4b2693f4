"""A bundle's bytes: the manifest (with its SHA-256) in a zstd skippable frame, then one zstd
frame holding the tar stream of the state's `pgdata/`. Blocking code: callers run it in a thread.

The skippable frame is what zstd itself skips, so `zstd -dc FILE | tar -t` lists the data
with stock tools, and the manifest is read (and checked) before any data is.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from taidon_proxy.store.bundle.manifest import BundleError, Manifest, parse, verify_chain

SKIPPABLE_MAGIC = 0x184D2A5A  # one of zstd's sixteen skippable-frame magics
_HEADER = struct.Struct("<II")
MAX_MANIFEST = 16 * 2**20
LEVEL = 3  # zstd's default: ~8x on a data directory, far faster than the disk on two cores
# Compressed bytes per decompress call. zstd can expand 1 byte to 32 KiB (RLE blocks), so
# this bounds what one call adds to memory: at most 16 MiB, however the bundle was made.
FEED = 512
DATA_ROOT = "pgdata"


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Digest:
    """A write-only file that keeps the SHA-256 and length of what passes through."""

    def __init__(self, out: _Sink | None = None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)


def _entries(pgdata: Path) -> Iterator[tuple[Path, str]]:
    """(path, name in the archive) for pgdata and everything under it, in a stable order."""
    yield pgdata, DATA_ROOT
    for dirpath, dirnames, filenames in os.walk(pgdata):
        dirnames.sort()
        base = Path(dirpath)
        rel = base.relative_to(pgdata)
        prefix = DATA_ROOT if rel == Path(".") else f"{DATA_ROOT}/{rel.as_posix()}"
        for name in sorted([*dirnames, *filenames]):
            yield base / name, f"{prefix}/{name}"


def write_tar(state_dir: Path, out: _Sink) -> int:
    """The tar stream of `state_dir/pgdata` (same files, same bytes); returns the entry count."""
    pgdata = state_dir / DATA_ROOT
    if not pgdata.is_dir():
        raise BundleError("content", "the state has no data directory (pgdata/)")
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for path, name in _entries(pgdata):
            info = tar.gettarinfo(str(path), arcname=name)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir():
                tar.addfile(info)
            else:  # a tablespace's symlink in pg_tblspc, a socket: nothing a bundle can carry
                raise BundleError(
                    "content",
                    f"{name} is not a regular file or directory; only self-contained data"
                    " directories can be exported (no tablespaces)",
                )
            count += 1
    return count


def measure(state_dir: Path) -> tuple[str, int, int]:
    """(SHA-256, size, entries) of the tar stream `write_tar` produces, without storing it."""
    digest = _Digest()
    count = write_tar(state_dir, digest)
    return digest.sha.hexdigest(), digest.size, count


def manifest_frame(raw: bytes) -> bytes:
    """The skippable frame of a manifest: its JSON, a newline, the JSON's SHA-256 in hex
    (damage to the provenance fields, which no id covers, is caught too)."""
    payload = raw + b"\n" + hashlib.sha256(raw).hexdigest().encode()
    return _HEADER.pack(SKIPPABLE_MAGIC, len(payload)) + payload


def write_bundle(manifest: Manifest, state_dir: Path, out: BinaryIO) -> None:
    """Manifest frame, then the compressed tar; the data must hash as the manifest says."""
    out.write(manifest_frame(manifest.dump()))
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True)
    with compressor.stream_writer(out, closefd=False) as z:
        digest = _Digest(z)
        write_tar(state_dir, digest)
    c = manifest.content
    if digest.sha.hexdigest() != c.sha256 or digest.size != c.size:
        raise BundleError("content", "the state's files changed while it was exported")


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        chunk = src.read(min(left, 2**20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_manifest(src: BinaryIO) -> Manifest:
    """The manifest at the start of `src`, parsed, with every id of its chain recomputed."""
    head = _read_exact(src, _HEADER.size)
    if not head:
        raise BundleError("format", "not a state bundle: the file is empty")
    if len(head) < _HEADER.size:
        raise BundleError("truncated", "truncated: the file ends inside the manifest header")
    magic, length = _HEADER.unpack(head)
    if magic != SKIPPABLE_MAGIC:
        raise BundleError("format", "not a state bundle: it does not start with a manifest")
    if length > MAX_MANIFEST:
        raise BundleError(
            "manifest", f"the manifest claims {length} bytes (a bundle's is at most {MAX_MANIFEST})"
        )
    raw = _read_exact(src, length)
    if len(raw) < length:
        raise BundleError(
            "truncated", f"truncated: the file ends inside the manifest ({len(raw)}/{length} bytes)"
        )
    body, _, digest = raw.rpartition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise BundleError("manifest", "the manifest is damaged: it does not match its checksum")
    manifest = parse(body)
    verify_chain(manifest)
    return manifest


class _Inflate:
    """The tar stream out of the zstd frame, for tarfile's reads: hashed as it is produced,
    never more than the manifest's size, and the frame must end where the file does."""

    def __init__(self, src: BinaryIO, limit: int) -> None:
        self._src = src
        self._z = zstandard.ZstdDecompressor().decompressobj()
        self._buf = bytearray()
        self._limit = limit
        self.sha = hashlib.sha256()
        self.size = 0

    def _fill(self, want: int) -> None:
        while len(self._buf) < want and not self._z.eof:
            chunk = self._src.read(FEED)
            if not chunk:
                raise BundleError(
                    "truncated", "truncated: the file ends inside the data (incomplete zstd frame)"
                )
            try:
                out = self._z.decompress(chunk)
            except zstandard.ZstdError as e:
                raise BundleError("content", f"the data is corrupt ({e})") from None
            self.sha.update(out)
            self.size += len(out)
            if self.size > self._limit:
                raise BundleError(
                    "content", f"the data is larger than the manifest's {self._limit} bytes"
                )
            self._buf += out

    def read(self, n: int = -1) -> bytes:
        self._fill(n if n >= 0 else self._limit + 1)
        size = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def finish(self) -> None:
        """Read to the frame's end; refuse anything after it."""
        while not self._z.eof:
            self._buf.clear()
            self._fill(FEED * 64)
        self._buf.clear()
        if self._z.unused_data or self._src.read(1):
            raise BundleError("content", "unexpected bytes after the data frame")


def _check_digest(inflate: _Inflate, manifest: Manifest) -> None:
    c = manifest.content
    if inflate.size != c.size:
        raise BundleError(
            "content", f"the data is {inflate.size} bytes; the manifest says {c.size}"
        )
    sha = inflate.sha.hexdigest()
    if sha != c.sha256:
        raise BundleError(
            "content", f"checksum mismatch: the data hashes to {sha[:16]}…, the manifest says"
            f" {c.sha256[:16]}…",
        )  # fmt: skip


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    name = member.name
    if name != DATA_ROOT and not name.startswith(DATA_ROOT + "/"):
        raise BundleError("content", f"the data holds {name!r}, outside {DATA_ROOT}/")
    if not (member.isreg() or member.isdir()):
        raise BundleError(
            "content", f"the data holds {name!r}, which is not a regular file or directory"
        )
    try:
        # Absolute names, '..', modes no data directory has: tarfile's own checks.
        return tarfile.tar_filter(member, dest)
    except tarfile.FilterError as e:
        raise BundleError("content", f"the data holds an unsafe entry: {e}") from None


def extract(manifest: Manifest, src: BinaryIO, dest: Path) -> None:
    """The data of the bundle (read after its manifest) into `dest/pgdata`, checked whole:
    size, SHA-256, entry count and PG_VERSION must be what the manifest says."""
    inflate = _Inflate(src, manifest.content.size)
    count = 0
    try:
        with tarfile.open(fileobj=inflate, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                # As root, owners come from the bundle (numeric): the servers' user where it
                # was made; the runtime re-owns a data directory whose owner differs.
                tar.extract(member, dest, numeric_owner=True, filter=_member_filter)
                count += 1
    except tarfile.TarError as e:
        raise BundleError("content", f"the data is not a valid tar stream ({e})") from None
    inflate.finish()
    _check_digest(inflate, manifest)
    c = manifest.content
    if count != c.files:
        raise BundleError("content", f"the data holds {count} entries; the manifest says {c.files}")
    try:
        pg_version = (dest / DATA_ROOT / "PG_VERSION").read_text().strip()
    except OSError:
        raise BundleError("content", "the data has no PG_VERSION: not a data directory") from None
    if pg_version != str(manifest.engine.major):
        raise BundleError(
            "content",
            f"the data directory is Postgres {pg_version}; the manifest says"
            f" {manifest.engine.major}",
        )


def verify_data(manifest: Manifest, src: BinaryIO) -> None:
    """Check the data after the manifest without storing it: frame, size and checksum."""
    inflate = _Inflate(src, manifest.content.size)
    inflate.finish()
    _check_digest(inflate, manifest)


def verify(src: BinaryIO) -> Manifest:
    """Check a whole bundle without storing its data: manifest, chain, size and checksum."""
    manifest = read_manifest(src)
    verify_data(manifest, src)
    return manifest
