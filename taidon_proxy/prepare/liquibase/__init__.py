"""Liquibase recipes (kind lb): plan, boundary relay and the adapter the builder calls."""

from taidon_proxy.prepare.liquibase.adapter import LiquibaseAdapter

__all__ = ["LiquibaseAdapter"]
