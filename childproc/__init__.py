"""A tiny leaf library both `snapshots` and `taidon_proxy` start their children with."""

from childproc.spawn import Child, run_child, spawn

__all__ = ["Child", "run_child", "spawn"]
