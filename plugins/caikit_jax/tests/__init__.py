"""Tests of the bundled ``jax`` plugins (collected with the core's tests; see pyproject)."""
