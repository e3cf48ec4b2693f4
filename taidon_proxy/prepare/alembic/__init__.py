"""Recipes of kind alembic: one state per Alembic revision, planned by Alembic's own API."""
