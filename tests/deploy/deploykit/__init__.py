"""Helpers for the deploy/ tests: rendering overlays, the tools venv, a NetworkPolicy
reachability model, and the Istio rules that istiod enforces beyond the CRD schemas."""
