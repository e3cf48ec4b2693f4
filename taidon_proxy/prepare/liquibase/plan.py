"""Liquibase's own plan (offline update-sql), step hashes and the chained state ids."""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.config import LiquibasePrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.liquibase.launcher import (
    PLAN_JAVA_OPTS,
    ClassArchive,
    Masker,
    error_text,
    global_args,
    recipe_args,
    run_liquibase,
)
from taidon_proxy.store.ids import canonical, digest, step_state_id

STEP_KIND = "lb"


@dataclass(frozen=True)
class ChangeSet:
    """One row Liquibase will write to databasechangelog (what a boundary is checked against)."""

    id: str
    author: str
    filename: str
    md5sum: str

    @property
    def label(self) -> str:
        return f"{self.id}::{self.author}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.id, self.author, self.filename, self.md5sum)


def step_hash(cs: ChangeSet, prep: LiquibasePrepare) -> str:
    """Liquibase's checksum plus the row's identity and every setting that changes what runs."""
    return digest(
        "lb-changeset",
        cs.id,
        cs.author,
        cs.filename,
        cs.md5sum,
        prep.contexts or "",
        prep.labels or "",
        canonical(prep.parameters),
    )


def chain(root: str, plan: Sequence[ChangeSet], prep: LiquibasePrepare) -> list[str]:
    ids, parent = [], root
    for cs in plan:
        parent = step_state_id(parent, STEP_KIND, step_hash(cs, prep))
        ids.append(parent)
    return ids


def parse_plan_csv(text: str) -> list[ChangeSet]:
    """The databasechangelog CSV an offline update-sql writes, in execution order."""
    rows = list(csv.DictReader(text.splitlines()))
    rows.sort(key=lambda r: int(r.get("ORDEREXECUTED") or 0))
    return [
        ChangeSet(r["ID"], r["AUTHOR"], r["FILENAME"], r.get("MD5SUM") or "")
        for r in rows
        if (r.get("EXECTYPE") or "EXECUTED") in ("EXECUTED", "MARK_RAN", "RERAN")
    ]


async def liquibase_plan(
    launcher: Path,
    prep: LiquibasePrepare,
    *,
    masker: Masker,
    on_line: Callable[[str], None],
    archive: ClassArchive | None = None,
) -> list[ChangeSet]:
    """Every changeset a fresh database gets, with checksums: no server, one short JVM.

    With an archive, this run maps it, or writes it at exit if there is none yet (the plan
    runs beside the update, off its path)."""
    scratch = Path(tempfile.mkdtemp(prefix="taidon-lbplan-"))
    try:
        out = scratch / "plan.csv"
        argv = [
            str(launcher),
            *global_args(prep),
            "update-sql",
            f"--url=offline:postgresql?changeLogFile={out}&outputLiquibaseSql=none",
            f"--output-file={scratch / 'plan.sql'}",
            *recipe_args(prep),
        ]
        masker = Masker([*masker.pairs, (str(scratch), "(plan)")])
        extra, made = archive.make() if archive is not None else ("", None)
        try:
            res = await run_liquibase(
                argv, cwd=scratch, java_opts=f"{PLAN_JAVA_OPTS} {extra}".strip(),
                on_line=on_line, masker=masker,
            )  # fmt: skip
        except BaseException:
            if archive is not None:
                archive.keep(made, ok=False)
            raise
        if archive is not None:
            archive.keep(made, ok=res.returncode == 0)
        if res.returncode != 0:
            msg, detail = error_text(res.tail, res.returncode)
            raise BuildFailed(f"Liquibase could not read the changelog: {msg}", detail=detail)
        try:
            text = out.read_text(encoding="utf-8")
        except OSError:
            return []  # nothing to run: Liquibase wrote no rows
        return parse_plan_csv(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
