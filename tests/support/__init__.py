"""Helpers for tests: real components started and stopped by the tests themselves."""
