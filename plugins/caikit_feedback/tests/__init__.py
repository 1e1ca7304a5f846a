"""Tests of the bundled ``feedback`` plugins (collected with the core's tests; see pyproject)."""
