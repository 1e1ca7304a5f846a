"""caikit's JAX backend (the ``jax`` plugins): SFT, DPO, PPO and a soft-label preference
model on Tunix's Llama, corrected by :mod:`caikit_jax.shims`.

Importing this package does not import JAX or Tunix.
"""
