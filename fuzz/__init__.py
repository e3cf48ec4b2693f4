"""Fuzz runs of the protocol core (long runs are scripts; the suite runs a short one)."""
