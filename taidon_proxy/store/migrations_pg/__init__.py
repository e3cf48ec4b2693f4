"""Numbered SQL migrations of the Postgres metadata schema (applied by store/pg_migrate.py)."""
