"""The pytest plugin: a fresh database of a recipe's state per test (entry point `taidon`)."""

from taidon_proxy.pytest_plugin.endpoint import Endpoint, TaidonDatabase
from taidon_proxy.pytest_plugin.options import Settings

__all__ = ["Endpoint", "Settings", "TaidonDatabase"]
