"""Envoy ext_authz decision service for ML inference APIs."""

__version__ = "0.1.0"
