"""caikit's bundled run report: ``caikit report RUN_DIR`` (see :mod:`caikit_report.plugin`)."""
