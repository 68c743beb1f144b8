"""`authz demo`: the service, a real Envoy configured as an Istio sidecar, and a model stand-in.

`processes` and `upstream` are also the building blocks of the end-to-end tests (tests/e2e).
"""
