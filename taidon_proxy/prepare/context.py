"""What a recipe adapter gets to build with, and the adapter interface itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from taidon_proxy.config import Config, Recipe
from taidon_proxy.prepare.gitref import Checkout
from taidon_proxy.prepare.jobs import Job
from taidon_proxy.prepare.session import WorkSession


@dataclass(frozen=True)
class BuildResult:
    state_id: str  # the recipe's final state
    inputs: list[str]  # every input file the fingerprint must cover


@dataclass(frozen=True)
class PlannedStep:
    state_id: str
    label: str
    cached: bool


@dataclass
class BuildContext:
    alias: str
    recipe: Recipe
    config: Config
    base_dir: Path  # relative paths and psql's working directory
    database: str
    root_state: str
    job: Job
    has_state: Callable[[str], Awaitable[bool]]
    open_session: Callable[[str], Awaitable[WorkSession]]
    # At a git ref: the checked-out directory no input may leave (None: the work tree).
    confine: Path | None = None
    checkout: Checkout | None = None  # at a git ref: its commit and tree (provenance)


class RecipeAdapter(Protocol):
    kind: str

    async def plan(self, ctx: BuildContext) -> list[PlannedStep]:
        """Every step with its state id and whether it is cached (may start tools)."""
        ...

    async def build(self, ctx: BuildContext) -> BuildResult:
        """Make sure every state of the recipe exists; return the final one."""
        ...
