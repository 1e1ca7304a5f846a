"""caikit's bundled Ray executor: map stages on Ray Data actor pools."""
