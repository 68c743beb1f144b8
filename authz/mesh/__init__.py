"""Envoy configuration for running this service as an Istio CUSTOM ext_authz provider.

`sidecar` renders the Envoy bootstrap an Istio sidecar would run for an AuthorizationPolicy with
`action: CUSTOM`; `envoy_binary` finds the Envoy executable for tests and the demo.
"""
