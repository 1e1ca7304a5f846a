"""Pytest setup for the whole checkout: the core's tests (tests/) and the bundled
plugins' tests (plugins/*/tests/) share the fixtures of :mod:`tests.shared`."""

pytest_plugins = ["tests.shared"]
