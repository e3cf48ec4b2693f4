"""What names an instance: a recipe alias or an exact state, a label, and an isolation."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from taidon_proxy.routing import DEFAULT_LABEL


class Isolation(StrEnum):
    """One server per alias:label for all its connections, or one per connection."""

    SHARED = "shared"
    CONNECTION = "connection"


@dataclass(frozen=True)
class InstanceKey:
    """An instance's identity. Exactly one of `alias` (a recipe) and `state` (an exact state,
    `state:ID` routes) is set; a spare (a started, never used per-connection instance) names
    its alias and the state it was cloned from, and no label. A recipe's key may carry a git
    ref (`shop@feature-x`: that ref's state, its own instances). `str()` is the text form the
    metadata, the logs and the API show: ALIAS:LABEL, ALIAS@REF:LABEL, state:ID:LABEL or
    spare:ALIAS:ID."""

    alias: str | None
    state: str | None
    label: str | None
    isolation: Isolation
    spare: bool = False
    ref: str | None = None  # a recipe's key: its files as of this git ref

    @classmethod
    def recipe(
        cls,
        alias: str,
        label: str = DEFAULT_LABEL,
        isolation: Isolation = Isolation.SHARED,
        ref: str | None = None,
    ) -> InstanceKey:
        return cls(alias, None, label, isolation, ref=ref)

    @classmethod
    def exact(
        cls, state: str, label: str = DEFAULT_LABEL, isolation: Isolation = Isolation.SHARED
    ) -> InstanceKey:
        return cls(None, state, label, isolation)

    @classmethod
    def of_spare(
        cls, alias: str | None, state: str, isolation: Isolation = Isolation.CONNECTION
    ) -> InstanceKey:
        """A spare of a warm pool; a shared one (for new labels) is started with the shared
        settings. Both have the text form spare:ALIAS:ID."""
        return cls(alias, state, None, isolation, spare=True)

    @classmethod
    def parse(cls, text: str, isolation: Isolation = Isolation.SHARED) -> InstanceKey:
        """The key a text form names (a shared instance's record keeps the text)."""
        head, _, rest = text.partition(":")
        if head == "spare":
            alias, _, state = rest.rpartition(":")
            return cls.of_spare(alias or None, state)
        if head == "state":
            state, _, label = rest.partition(":")
            return cls.exact(state, label or DEFAULT_LABEL, isolation)
        alias, at, ref = head.partition("@")  # aliases have no @, git refs no colon
        return cls.recipe(alias, rest or DEFAULT_LABEL, isolation, ref if at else None)

    @property
    def is_state(self) -> bool:
        """An exact state's instance (`state:ID`), not a recipe's (a spare is a recipe's)."""
        return self.state is not None and not self.spare

    def __str__(self) -> str:
        if self.spare:
            return f"spare:{self.alias}:{self.state}"
        if self.state is not None:
            return f"state:{self.state}:{self.label}"
        if self.ref is not None:
            return f"{self.alias}@{self.ref}:{self.label}"
        return f"{self.alias}:{self.label}"
