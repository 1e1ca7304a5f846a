"""Tests of the bundled ``torch`` plugins (collected with the core's tests; see pyproject)."""
