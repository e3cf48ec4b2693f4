"""A structural schema diff of two databases: capture each catalog, compare the captures."""
