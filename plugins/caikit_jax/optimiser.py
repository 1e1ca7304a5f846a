"""The ``jax`` policy optimiser: :class:`JaxOptimiser`, SFT, DPO and PPO on Tunix's Llama.

- :meth:`JaxOptimiser.sft`: :func:`caikit_jax.sft.train_sft` with
  ``[policy_optimiser.sft]``.
- ``algorithm = "dpo"``: :func:`caikit_jax.dpo.train_dpo` with ``[policy_optimiser.dpo]``.
- ``algorithm = "ppo"``: :func:`caikit_jax.ppo.train_ppo` with ``[policy_optimiser.ppo]``.

Every result is a Hugging Face checkpoint (:func:`caikit_jax.model.save_checkpoint`)
that transformers and the ``hf`` generator load, plus a JSON record. The algorithm
modules (and with them JAX) are imported when a method runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from caikit_core.interfaces import FitReport, PreferenceModel
from caikit_core.records import LabelledComparison, Prompt, RevisionTrace
from caikit_jax import allocator
from caikit_jax.common import RL_RECORD, WHO, checkpoint_folder, write_record
from caikit_jax.config import CAPABILITIES, JaxOptimiserConfig

__all__ = ["JaxOptimiser"]

log = logging.getLogger("caikit.jax")


class JaxOptimiser:
    """SFT, DPO and PPO on JAX (see the module docstring)."""

    capabilities: frozenset[str] = CAPABILITIES

    def __init__(self, config: JaxOptimiserConfig) -> None:
        self.config = config
        #: ``(step, loss)`` of every step of the last run (PPO: the mean policy loss).
        self.losses: list[tuple[int, float]] = []

    # SL-CAI -------------------------------------------------------------------------------
    @allocator.tuned
    def sft(
        self,
        policy: str,
        examples: Sequence[RevisionTrace],
        out: Path,
        *,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """Fine-tune ``policy`` on the revisions of ``examples`` and save it to ``out``
        (resumable with ``checkpoint_dir``, see :mod:`caikit_jax.checkpoints`).

        Metrics as the ``torch`` optimiser reports them (``train_loss``,
        ``loss_first``, ``loss_last``, ``examples``, ``traces``, ``skipped_empty``,
        ``skipped_marked``, ``too_long``, ``steps``, ``seconds``) and
        ``compile_seconds`` (the first step, which includes XLA compilation) and
        ``time/compile`` (the seconds JAX spent compiling, :mod:`caikit_jax.compilation`).
        What the stage leaves in memory is freed when it returns
        (:func:`caikit_jax.memory.release`).
        """
        from caikit_jax.memory import release
        from caikit_jax.sft import train_sft

        report, self.losses = train_sft(self.config, policy, examples, out, checkpoint_dir)
        release(compiled=False)  # its compiled step stays for another fit in this process
        return report

    # RL-CAI -------------------------------------------------------------------------------
    @allocator.tuned
    def optimise(
        self,
        policy: str,
        reference: str,
        reward: PreferenceModel,
        prompts: Sequence[Prompt],
        labelled: Sequence[LabelledComparison],
        out: Path,
        *,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """Optimise ``policy`` with ``config.algorithm`` (``"ppo"`` or ``"dpo"``), keeping
        it close to ``reference``; save it to ``out``. Both are resumable with
        ``checkpoint_dir`` (:mod:`caikit_jax.checkpoints`). :attr:`losses` holds each
        step's loss (PPO: the step's mean policy loss), and PPO's report a ``history``
        row per step (``loss``, ``value_loss``, ``kl``, ``reward``, ``beta``,
        ``response_length``, ``grad_norm``).

        The metrics include ``time/compile``, the seconds JAX spent compiling (or
        loading from the persistent cache, :mod:`caikit_jax.compilation`); what the
        stage leaves in memory is freed before this returns
        (:func:`caikit_jax.memory.release`)."""
        from caikit_jax.compilation import COMPILE_METRIC, CompileClock, use_persistent_cache
        from caikit_jax.memory import release
        from caikit_jax.model import check_device

        cfg = self.config
        started = time.perf_counter()
        check_device(cfg.device, WHO)
        policy_folder = checkpoint_folder(policy, "policy")
        reference_folder = checkpoint_folder(reference, "reference")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        use_persistent_cache()
        history: list[dict[str, float]] = []
        from caikit_jax.shims import tracer_sharding_without_origin  # imports Tunix

        with CompileClock() as clock, tracer_sharding_without_origin():
            if cfg.algorithm == "dpo":
                from caikit_jax.dpo import train_dpo

                metrics, self.losses = train_dpo(
                    cfg, policy_folder, reference_folder, labelled, out, checkpoint_dir
                )
            else:
                from caikit_jax.ppo import train_ppo

                metrics, history = train_ppo(
                    cfg,
                    policy=policy_folder,
                    reference=reference_folder,
                    reward=reward,
                    prompts=prompts,
                    out=out,
                    checkpoint_dir=checkpoint_dir,
                )
                self.losses = [(int(row["step"]), row["loss"]) for row in history]
        release()
        metrics[COMPILE_METRIC] = clock.seconds
        metrics["seconds"] = time.perf_counter() - started
        write_record(out / RL_RECORD, policy_folder, cfg, metrics, self.losses)
        return FitReport(str(out), metrics, history=history)
