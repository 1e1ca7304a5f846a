"""caikit's bundled local executor."""
