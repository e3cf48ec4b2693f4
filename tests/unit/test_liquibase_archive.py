"""The JVM class archive kept for Liquibase runs: which options a run gets, what is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from taidon_proxy.prepare.liquibase.launcher import ClassArchive

pytestmark = pytest.mark.unit


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    p = tmp_path / "tools" / "liquibase"
    p.parent.mkdir()
    p.write_text("#!/bin/sh\n")
    return p


def test_first_run_writes_the_archive_later_runs_map_it(tmp_path: Path, launcher: Path) -> None:
    archive = ClassArchive(tmp_path / "store" / "liquibase", launcher)
    assert archive.usable
    assert archive.use() == ""
    opts, made = archive.make()
    assert made is not None and opts.startswith(f"-XX:ArchiveClassesAtExit={made} ")
    made.write_bytes(b"classes")  # what the JVM writes at exit
    archive.keep(made, ok=True)
    assert not made.exists() and archive.path.read_bytes() == b"classes"
    assert archive.use().startswith(f"-XX:SharedArchiveFile={archive.path} ")
    assert archive.make() == (archive.use(), None)


def test_a_failed_run_leaves_no_archive(tmp_path: Path, launcher: Path) -> None:
    archive = ClassArchive(tmp_path, launcher)
    _, made = archive.make()
    assert made is not None
    made.write_bytes(b"partial")
    archive.keep(made, ok=False)
    assert not made.exists() and not archive.path.exists()
    archive.keep(None, ok=True)  # a run that made nothing


def test_the_key_follows_the_launcher(tmp_path: Path, launcher: Path) -> None:
    first = ClassArchive(tmp_path, launcher).path
    assert ClassArchive(tmp_path, launcher).path == first
    other = launcher.with_name("liquibase2")
    other.write_text("#!/bin/sh\n")
    assert ClassArchive(tmp_path, other).path != first


def test_paths_with_blanks_are_not_passed(tmp_path: Path, launcher: Path) -> None:
    # JAVA_OPTS is split on blanks by the launcher script.
    archive = ClassArchive(tmp_path / "my store", launcher)
    assert not archive.usable
    assert archive.use() == "" and archive.make() == ("", None)
