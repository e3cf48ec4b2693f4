"""Recipes of kind django: one state per Django migration, planned by Django's own executor."""
