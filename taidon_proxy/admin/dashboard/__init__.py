"""The web dashboard: server-rendered pages on the admin endpoint whose actions call the /v1 API."""
