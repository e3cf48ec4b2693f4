"""Route tables of the admin API, one module per resource."""
