"""The ``torch`` policy optimiser: :class:`TorchOptimiser`.

:meth:`TorchOptimiser.sft` runs :func:`caikit_torch.sft.fine_tune` with
``[policy_optimiser.sft]``; :meth:`TorchOptimiser.optimise` runs the configured
RL-CAI algorithm: :func:`caikit_torch.ppo.optimise_ppo` (``"ppo"``),
:func:`caikit_torch.dpo.train_dpo` (``"dpo"``) or
:func:`caikit_torch.group.train_group` (``"rloo"``, ``"grpo"``), each with its own
table of settings. The algorithm modules are imported when they run.

Each RL-CAI algorithm saves a plain Hugging Face checkpoint (safetensors) and its
tokenizer into ``out``, and :data:`~caikit_torch.common.RL_RECORD` with the
algorithm, the settings, the final metrics and every logged step.

This module imports torch, transformers, TRL and datasets at import time;
:mod:`caikit_torch.plugin` imports it only when the factory runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
import transformers
import trl

from caikit_core.errors import TrainingStopped
from caikit_core.interfaces import FitReport, PreferenceModel, RolloutGenerator
from caikit_core.records import LabelledComparison, Prompt, RevisionTrace
from caikit_core.training.data import require_sft_examples
from caikit_torch.common import (
    WHO,
    RLRun,
    policy_folder,
    progress_bars,
    resolve_device,
)
from caikit_torch.config import CAPABILITIES, TorchOptimiserConfig

__all__ = ["TorchOptimiser"]

log = logging.getLogger("caikit.torch")


class TorchOptimiser:
    """Fine-tunes and RL-optimises local checkpoints with TRL (see the module docstring)."""

    capabilities: frozenset[str] = CAPABILITIES

    def __init__(self, config: TorchOptimiserConfig) -> None:
        self.config = config
        #: ``(step, loss)`` of each logged step of the last :meth:`sft` call.
        self.losses: list[tuple[int, float]] = []

    # SL-CAI ---------------------------------------------------------------------------
    def sft(
        self,
        policy: str,
        examples: Sequence[RevisionTrace],
        out: Path,
        *,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """Fine-tune ``policy`` on the revisions of ``examples`` and save it to ``out``.

        :param policy: a local Hugging Face checkpoint folder with a chat template.
        :param examples: revision traces; skipped ones and ones with an empty final
            response are left out (and counted in the metrics).
        :param out: the folder to save the fine-tuned checkpoint in (created if
            missing).
        :param checkpoint_dir: where to keep resumable checkpoints (``checkpoint_every_*``)
            and resume from the newest one; ``None``: none.
        :returns: ``out`` and the metrics ``train_loss`` (mean over steps),
            ``loss_first``, ``loss_last``, ``examples``, ``traces``,
            ``skipped_empty``, ``skipped_marked``, ``too_long``, ``steps``,
            ``epochs`` and ``seconds``.
        :raises CaikitError: no traces, or none with a response to train on.
        :raises PluginError: the policy folder is missing or cannot be loaded.
        """
        from caikit_torch.sft import SFT_RECORD, fine_tune, fine_tune_launched

        cfg = self.config
        started = time.perf_counter()
        data = require_sft_examples(examples, cfg.sft.target, who=WHO)
        folder = policy_folder(policy, allow_pickle=cfg.allow_pickle)
        device = resolve_device(cfg.device)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with progress_bars(log.isEnabledFor(logging.INFO)):
            fit = fine_tune if cfg.num_processes == 1 else fine_tune_launched
            metrics, self.losses = fit(cfg, folder, data, out, device, checkpoint_dir)
        metrics["seconds"] = time.perf_counter() - started
        record = {
            "base": str(folder),
            "config": attrs.asdict(cfg),
            "metrics": metrics,
            "losses": self.losses,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        (out / SFT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        log.info(
            "sft: %d steps, loss %.4f -> %.4f",
            int(metrics["steps"]),
            metrics["loss_first"],
            metrics["loss_last"],
        )
        return FitReport(str(out), metrics)

    # RL-CAI ---------------------------------------------------------------------------
    def optimise(
        self,
        policy: str,
        reference: str,
        reward: PreferenceModel,
        prompts: Sequence[Prompt],
        labelled: Sequence[LabelledComparison],
        out: Path,
        *,
        rollouts: RolloutGenerator | None = None,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """RL-CAI: optimise ``policy`` with the configured ``algorithm`` and save it to ``out``.

        ``"ppo"``, ``"rloo"`` and ``"grpo"`` sample responses to ``prompts`` and reward
        them with ``reward.score``, penalising the KL divergence to ``reference``;
        ``"dpo"`` trains on the ``labelled`` pairs directly. With ``rollouts`` (a
        generator loaded with ``policy``), responses are sampled by it, and the
        policy's weights are pushed into it after every optimiser step.

        :param policy: a local Hugging Face checkpoint folder (the SFT model).
        :param reference: the checkpoint the KL penalty refers to (usually ``policy``).
        :param reward: a fitted (or loaded) preference model.
        :param prompts: the RL prompts (``ppo``, ``rloo``, ``grpo``).
        :param labelled: the AI-labelled comparisons (``dpo``).
        :param out: the folder to save the optimised checkpoint in (created if missing);
            ``caikit_rl.json`` beside it records the settings and per-step metrics.
        :param checkpoint_dir: where to keep resumable checkpoints
            (``checkpoint_every_*``) and resume from the newest one; ``"rloo"`` and
            ``"grpo"`` save at rollout boundaries only, and not with ``rollouts``.
        :returns: ``out`` and the final metrics.
        :raises CaikitError: nothing to train on, or settings that cannot work together.
        :raises PluginError: a model folder is missing or cannot be loaded.
        :raises TrainingStopped: the KL to the reference went above ``kl_bound``.
        """
        cfg = self.config
        started = time.perf_counter()
        policy_dir = policy_folder(policy, allow_pickle=cfg.allow_pickle)
        reference_dir = policy_folder(reference, WHO, "reference", allow_pickle=cfg.allow_pickle)
        device = resolve_device(cfg.device)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        run = RLRun(cfg, policy_dir, reference_dir, device, out, rollouts)
        run.checkpoint_dir = checkpoint_dir
        with progress_bars(log.isEnabledFor(logging.INFO)):
            try:
                if cfg.algorithm == "dpo":
                    from caikit_torch.dpo import train_dpo, train_dpo_launched

                    train = train_dpo if cfg.num_processes == 1 else train_dpo_launched
                    metrics = train(run, labelled)
                elif cfg.algorithm == "ppo":
                    from caikit_torch.ppo import optimise_ppo

                    metrics = optimise_ppo(run, reward, prompts, checkpoint_dir)
                else:
                    from caikit_torch.group import train_group

                    metrics = train_group(run, reward, prompts)
            except TrainingStopped as stopped:
                run.write_record({}, stopped=str(stopped))
                raise
        metrics["seconds"] = time.perf_counter() - started
        run.write_record(metrics)
        log.info("%s: done in %.1fs", cfg.algorithm, metrics["seconds"])
        return FitReport(str(out), metrics, history=run.history)
