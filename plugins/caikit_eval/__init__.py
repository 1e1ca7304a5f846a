"""caikit's bundled evaluation instruments (the ``eval`` plugin): ``hhh``,
``hh-alignment`` and ``position-bias``.

Importing this package imports no machine-learning framework: the instruments drive
whatever labeller, generator and preference model the run names, through the
:class:`~caikit_core.evaluation.EvalContext` they are given.
"""
