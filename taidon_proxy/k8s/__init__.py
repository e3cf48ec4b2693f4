"""Kubernetes: the manifests of instances and builds, the controller, and the gateway's client."""
