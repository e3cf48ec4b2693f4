"""A tiny leaf library both `snapshots` and `taidon_proxy` start their children with."""

from childproc.spawn import Child, dies_with_parent, run_child, spawn

__all__ = ["Child", "dies_with_parent", "run_child", "spawn"]
