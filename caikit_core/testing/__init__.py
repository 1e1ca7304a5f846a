"""Helpers for testing caikit and its plugins (tiny offline models, ...)."""
