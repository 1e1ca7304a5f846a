"""Tests of the bundled ``hf`` plugins (collected with the core's tests; see pyproject)."""
