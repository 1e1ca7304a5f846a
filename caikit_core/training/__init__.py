"""Backend-shared training helpers: the optimisers' settings, their training data and
metrics, used alike by the ``torch`` and ``jax`` plugins (and any third-party backend).

- :mod:`caikit_core.training.settings`: backend-neutral settings of SFT, DPO, PPO,
  RLOO/GRPO and the preference model (``[policy_optimiser.sft]`` ... tables);
- :mod:`caikit_core.training.data`: SFT examples and DPO pairs from the run's records;
- :mod:`caikit_core.training.metrics`: preference-model metrics and score checks.

Nothing here imports torch or jax.
"""
