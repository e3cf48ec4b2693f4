"""A directory of a git repository as of a ref: resolved through git's plumbing, cached, and
materialised once per tree id under the store (`trees/<tree-id>/`, written atomically)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from taidon_proxy.errors import TaidonError, UnknownDatabase

log = structlog.get_logger("taidon.prepare.gitref")

GIT_TIMEOUT = 60.0
# A recipe directory larger than this is refused at a ref (it would be copied whole).
MAX_TREE_BYTES = 512 << 20
_FULL_ID = re.compile(r"^[0-9a-f]{40}$")
NOT_A_REPOSITORY = "55000"  # object_not_in_prerequisite_state
UNDEFINED_FILE = "58P01"
# A ref is one argument after --end-of-options: never taken for an option.
_VERIFY = ("rev-parse", "--verify", "--quiet", "--end-of-options")


class GitError(TaidonError):
    """git could not answer (not a repository, a broken object database)."""

    sqlstate = NOT_A_REPOSITORY


@dataclass(frozen=True)
class Repository:
    top: Path  # the work tree's top directory
    git_dir: Path  # this work tree's own git dir (HEAD)
    common_dir: Path  # refs, packed-refs, objects (the same as git_dir outside a worktree)


@dataclass(frozen=True)
class Checkout:
    """`root` (a directory of the work tree) as of `ref`: its files, from git, under `path`."""

    ref: str
    commit: str
    tree: str
    root: Path
    path: Path

    def rebase(self, p: Path) -> Path:
        """Where a work-tree path under `root` is in the checkout."""
        return self.path / p.relative_to(self.root)

    @property
    def short(self) -> str:
        return self.commit[:12]


Stamp = tuple[tuple[int, int, int] | None, ...]


async def git(repo_dir: Path, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Run git (argv, never a shell) in `repo_dir`; its exit status, stdout and stderr."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    proc = await asyncio.create_subprocess_exec(
        "git", "-C", str(repo_dir), *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        async with asyncio.timeout(GIT_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _symref_target(common: Path, loose: Path) -> tuple[int, int, int] | None:
    """The stat of the ref a symbolic ref file names (`ref: refs/heads/main`), else None."""
    try:
        text = loose.read_bytes()
    except OSError:
        return None
    if not text.startswith(b"ref: "):
        return None
    return _stat(common / text[5:].strip().decode(errors="surrogateescape"))


class GitTrees:
    """Resolves (directory, ref) to a checkout. A hit for an unchanged ref costs a few stat
    calls: the ref → commit answer is kept with the stat of every file git would read to
    answer it again (HEAD, packed-refs, the loose ref candidates); commit → tree and the
    materialised trees never change."""

    def __init__(self, store: Path) -> None:
        self.trees = store / "trees"
        self._repos: dict[Path, Repository] = {}
        self._commits: dict[tuple[Path, str], tuple[Stamp, str]] = {}
        self._tree_ids: dict[tuple[str, str], str] = {}  # (commit, subdir) → tree id
        self._locks: dict[str, asyncio.Lock] = {}

    async def checkout(self, root: Path, ref: str) -> Checkout:
        repo = await self.repository(root)
        commit = await self.commit(repo, ref)
        try:
            sub = root.relative_to(repo.top).as_posix()
        except ValueError:  # a recipe directory outside the work tree's top (a symlink)
            raise GitError(
                f"the recipe's directory {root.name} is not inside the git work tree"
            ) from None
        tree = await self._tree_id(repo, ref, commit, "" if sub == "." else sub)
        path = self.trees / tree
        if not path.is_dir():
            lock = self._locks.setdefault(tree, asyncio.Lock())
            async with lock:
                if not path.is_dir():
                    await self._materialise(repo, ref, tree, path)
        return Checkout(ref, commit, tree, root, path)

    async def repository(self, directory: Path) -> Repository:
        hit = self._repos.get(directory)
        if hit is not None:
            return hit
        rc, out, err = await git(
            directory, "rev-parse", "--show-toplevel", "--absolute-git-dir", "--git-common-dir"
        )
        if rc != 0:
            log.info("gitref.no_repository", directory=str(directory), error=err.decode()[-300:])
            raise GitError(
                "the recipe's directory is not in a git repository (a ref needs one)",
                hint="connect without @ref to use the files as they are, or git init the project",
            )
        lines = out.decode(errors="surrogateescape").splitlines()
        top, git_dir, common = Path(lines[0]), Path(lines[1]), Path(lines[2])
        if not common.is_absolute():
            common = (directory / common).resolve()
        repo = Repository(top, git_dir, common)
        self._repos[directory] = repo
        return repo

    def _stamp(self, repo: Repository, ref: str) -> Stamp:
        """The stat of every file `git rev-parse REF` reads (gitrevisions' lookup order), and
        of the branch a symbolic ref among them points at (HEAD → refs/heads/main)."""
        c = repo.common_dir
        files = [
            repo.git_dir / ref,
            c / ref,
            c / "refs" / ref,
            c / "refs" / "tags" / ref,
            c / "refs" / "heads" / ref,
            c / "refs" / "remotes" / ref,
            c / "refs" / "remotes" / ref / "HEAD",
        ]
        stamp = [_stat(repo.git_dir / "HEAD"), _stat(c / "packed-refs")]
        for f in files:
            st = _stat(f)
            stamp.append(st)
            if st is not None and st[1] < 1024:
                stamp.append(_symref_target(c, f))
        return tuple(stamp)

    async def commit(self, repo: Repository, ref: str) -> str:
        """The commit a ref names now (cached while no file git reads for it changed)."""
        key = (repo.common_dir, ref)
        stamp = () if _FULL_ID.match(ref) else self._stamp(repo, ref)
        hit = self._commits.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        rc, out, _ = await git(repo.top, *_VERIFY, f"{ref}^{{commit}}")
        if rc != 0:
            shallow = (repo.common_dir / "shallow").is_file()
            raise UnknownDatabase(
                f'git ref "{ref}" does not exist' + (" in this shallow clone" if shallow else ""),
                detail="no branch, tag or commit of the recipe's repository has that name"
                + (" (a shallow clone has only part of the history)" if shallow else ""),
                hint="fetch the rest with: git fetch --unshallow (or a deeper --depth)"
                if shallow
                else "list them with: git branch -a; git tag",
            )
        commit = out.decode().strip()
        self._commits[key] = (stamp, commit)
        return commit

    async def _tree_id(self, repo: Repository, ref: str, commit: str, sub: str) -> str:
        hit = self._tree_ids.get((commit, sub))
        if hit is not None:
            return hit
        spec = f"{commit}:{sub}" if sub else f"{commit}^{{tree}}"
        rc, out, _ = await git(repo.top, *_VERIFY, spec)
        if rc == 0:
            rc_t, kind, _ = await git(repo.top, "cat-file", "-t", out.decode().strip())
            rc = rc if rc_t == 0 and kind.strip() == b"tree" else 1
        if rc != 0:
            raise TaidonError(
                f'the recipe\'s directory {sub} does not exist at ref "{ref}"'
                f" (commit {commit[:12]})",
                sqlstate=UNDEFINED_FILE,
            )
        tree = out.decode().strip()
        self._tree_ids[(commit, sub)] = tree
        return tree

    async def _materialise(self, repo: Repository, ref: str, tree: str, path: Path) -> None:
        """Every blob of the tree into a temporary directory, then one rename into place."""
        rc, out, err = await git(repo.top, "ls-tree", "-r", "-z", "-l", "--full-tree", tree)
        if rc != 0:
            raise GitError(f'git could not list the files at ref "{ref}": {err.decode()[-200:]}')
        entries: list[tuple[str, str, str]] = []  # mode, oid, path
        total = 0
        for rec in out.split(b"\0"):
            if not rec:
                continue
            meta, _, name = rec.partition(b"\t")
            mode, kind, oid, size = meta.decode().split()
            if kind != "blob" or mode == "120000":
                continue  # submodules and symbolic links are not copied (docs/git-refs.md)
            total += int(size)
            entries.append((mode, oid, name.decode(errors="surrogateescape")))
        if total > MAX_TREE_BYTES:
            raise GitError(
                f'the recipe\'s directory at ref "{ref}" holds {total >> 20} MiB of files;'
                f" refs copy at most {MAX_TREE_BYTES >> 20} MiB",
                hint="point the recipe's files at a smaller directory",
            )
        stdin = b"".join(oid.encode() + b"\n" for _, oid, _ in entries)
        rc, blobs, err = await git(repo.top, "cat-file", "--batch", stdin=stdin)
        if rc != 0:
            raise GitError(f'git could not read the files at ref "{ref}": {err.decode()[-200:]}')
        await asyncio.to_thread(_write_tree, self.trees, tree, path, entries, blobs)
        log.info("gitref.materialised", ref=ref, tree=tree[:12], files=len(entries), bytes=total)


def _write_tree(
    trees: Path, tree: str, path: Path, entries: list[tuple[str, str, str]], blobs: bytes
) -> None:
    trees.mkdir(parents=True, exist_ok=True)
    os.chmod(trees, 0o755)
    tmp = trees / f".tmp-{tree[:12]}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o755)
    try:
        pos = 0
        for mode, oid, name in entries:
            nl = blobs.index(b"\n", pos)
            header = blobs[pos:nl].decode().split()
            if header[0] != oid or len(header) != 3:
                raise GitError(f"git cat-file answered {blobs[pos:nl]!r} for {oid}")
            size = int(header[2])
            data = blobs[nl + 1 : nl + 1 + size]
            pos = nl + 1 + size + 1
            target = tmp / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise GitError(f"a path in the tree leaves it: {name!r}")
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chmod(target, 0o755 if mode == "100755" else 0o644)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not another process's copy of the same tree
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
