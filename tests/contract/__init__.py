"""Contract suites: one suite per interface, run against every implementation."""
