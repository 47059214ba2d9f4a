"""Atlax: a Kubernetes-native reverse TLS tunnel."""

__version__ = "0.1.0"
