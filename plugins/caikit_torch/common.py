"""What the ``torch`` plugins' implementation modules share: checkpoint folders,
devices and precision, TRL trainer arguments, logging callbacks, and the state of one
RL-CAI run (:class:`RLRun`).

This module imports torch, transformers and datasets at import time; it never
imports :mod:`caikit_torch.plugin`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import datasets
import torch
import transformers
import trl

from caikit_core.errors import CaikitError, PluginError
from caikit_core.interfaces import PreferenceModel, RolloutGenerator
from caikit_core.models import check_weights
from caikit_core.records import Conversation, Message, Prompt, Sample
from caikit_core.training.metrics import checked_scores
from caikit_core.training.settings import REPORT_PACKAGES
from caikit_torch.config import TorchOptimiserConfig
from caikit_torch.distributed import is_main_process

__all__ = [
    "RL_RECORD",
    "WHO",
    "KLGuard",
    "LossLog",
    "RLRun",
    "as_conversation",
    "chat_turns",
    "checkpointing_argument",
    "load_model",
    "load_tokenizer",
    "lora_config",
    "policy_folder",
    "precision",
    "progress_bars",
    "resolve_device",
    "score_samples",
    "sequence_kl",
    "total_steps",
    "trainer_defaults",
]

log = logging.getLogger("caikit.torch")

#: How the policy optimiser names itself in errors.
WHO = "torch policy optimiser"
#: The file in a saved checkpoint that records how it was optimised (RL-CAI).
RL_RECORD = "caikit_rl.json"


class StepSettings(Protocol):
    """What :func:`total_steps` reads (:class:`~caikit_core.training.settings.SFTSettings`,
    :class:`~caikit_core.training.settings.DPOSettings`)."""

    @property
    def max_steps(self) -> int | None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def gradient_accumulation_steps(self) -> int: ...
    @property
    def epochs(self) -> float: ...


def policy_folder(
    policy: str,
    who: str = WHO,
    what: str = "policy",
    *,
    allow_pickle: bool = False,
    key: str = "policy_optimiser.allow_pickle",
) -> Path:
    """The checkpoint folder of ``policy``, or a :class:`PluginError` naming the path;
    a folder whose weights are pickle only is refused unless ``allow_pickle``
    (:func:`caikit_core.models.check_weights`, naming the run-file ``key``).

    :param who: the plugin named in errors.
    :param what: what the folder is for (``"policy"``, ``"reference"``, ``"trunk"``).
    """
    path = Path(policy).expanduser()
    if not path.exists():
        raise PluginError(
            f"{who}: {what} folder {path} does not exist (the {what} must be a local "
            "Hugging Face checkpoint folder)"
        )
    if not path.is_dir():
        raise PluginError(f"{who}: {what} {path} is not a folder")
    if not (path / "config.json").is_file():
        raise PluginError(
            f"{who}: {what} folder {path} is not a Hugging Face checkpoint (no config.json)"
        )
    check_weights(path, f"{who} ({what})", allow_pickle=allow_pickle, key=key)
    return path


def resolve_device(device: str, who: str = WHO) -> str:
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PluginError(f"{who}: device = 'cuda' but torch sees no CUDA device")
    return "cuda" if device in ("auto", "cuda") and cuda else "cpu"


def precision(dtype: str, device: str, who: str = WHO) -> tuple[torch.dtype, bool]:
    """The weights' dtype and whether to train with bfloat16 mixed precision."""
    bf16_ok = device == "cpu" or torch.cuda.is_bf16_supported()
    if dtype == "bfloat16":
        if not bf16_ok:
            raise PluginError(f"{who}: dtype = 'bfloat16' but this GPU does not support it")
        return torch.bfloat16, False
    if dtype == "float32":
        return torch.float32, False
    return torch.float32, device == "cuda" and bf16_ok


def total_steps(examples: int, cfg: StepSettings, processes: int = 1) -> int:
    """Optimiser steps of a fit over ``examples`` (``max_steps`` when set), each
    process taking ``batch_size`` of them per forward pass."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches = math.ceil(examples / (cfg.batch_size * processes))
    per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Show or hide datasets' and transformers' progress bars for the duration.

    Both libraries keep the setting in a global; it is restored afterwards.
    """
    hf_logging: Any = transformers.utils.logging
    datasets_shown = not datasets.utils.are_progress_bars_disabled()
    transformers_shown = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():  # an environment variable may overrule us: fine
        warnings.simplefilter("ignore")
        if show:
            datasets.utils.enable_progress_bars()
            hf_logging.enable_progress_bar()
        else:
            datasets.utils.disable_progress_bars()
            hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if datasets_shown:
                datasets.utils.enable_progress_bars()
            else:
                datasets.utils.disable_progress_bars()
            if transformers_shown:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()


class LossLog(transformers.TrainerCallback):
    """Logs the training loss: every logged step at DEBUG, about every tenth at INFO.

    :param total: the number of optimiser steps.
    :param label: what the log lines start with (``"sft"``, ``"dpo"``, ...).
    """

    def __init__(self, total: int, label: str = "sft") -> None:
        self.total = total
        self.label = label
        self.every = max(1, total // 10)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        step = int(state.global_step)
        level = logging.INFO if step % self.every == 0 or step == self.total else logging.DEBUG
        log.log(level, "%s: step %d/%d, loss %.4f", self.label, step, self.total, logs["loss"])


def checkpointing_argument() -> str:
    """The TrainingArguments field that turns on activation recomputation.

    transformers 5.24 calls it ``activation_checkpointing`` (keeping
    ``gradient_checkpointing`` as an older spelling); 5.12, the release the ``jax``
    extra resolves to (see docs/jax.md), knows only ``gradient_checkpointing``.
    """
    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def trainer_defaults(
    *,
    seed: int,
    device: str,
    bf16: bool,
    total: int = 100,
    logging_steps: int | None = None,
    checkpointing: bool = False,
    report_to: Sequence[str] = (),
) -> dict[str, Any]:
    """The TrainingArguments every caikit trainer shares: seeded, offline, nothing saved
    by the trainer itself (caikit saves the checkpoint), no hub, no tqdm;
    ``checkpointing`` recomputes activations in the backward pass. Reporting goes to
    ``report_to`` only (none by default); TensorBoard through
    :func:`add_report_callbacks`, which picks its folder (the trainer's own default is
    inside its scratch ``output_dir``, which is deleted)."""
    others = [t for t in report_targets(report_to) if t != "tensorboard"]
    reporting: dict[str, Any] = {"report_to": others or "none"}
    return {
        checkpointing_argument(): checkpointing,
        "bf16": bf16,
        "fp16": False,
        "use_cpu": device == "cpu",
        "seed": seed,
        "data_seed": seed,
        "logging_steps": logging_steps if logging_steps is not None else max(1, total // 100),
        "save_strategy": "no",
        "eval_strategy": "no",
        "push_to_hub": False,
        "dataloader_num_workers": 0,
        # across processes (num_processes): every trainable weight gets a gradient
        "ddp_find_unused_parameters": False,
        "disable_tqdm": True,
        **reporting,
    }


#: other packages that serve a ``report_to`` target as well (transformers' own rule)
_ALSO_SERVES = {"tensorboard": ("tensorboardX",)}


@contextlib.contextmanager
def scratch_or(folder: Path | None, prefix: str) -> Iterator[str]:
    """A trainer's ``output_dir``: ``folder`` (a fit's checkpoint folder, kept) when
    given, else a temporary folder removed afterwards."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        yield scratch


def report_targets(targets: Sequence[str]) -> list[str]:
    """``targets`` (a validated ``report_to``), once each target's package is
    importable; else a :class:`PluginError` naming the missing package."""
    import importlib.util

    missing = [
        f"{t} needs the {REPORT_PACKAGES[t]!r} package (pip install {REPORT_PACKAGES[t]})"
        for t in targets
        if all(
            importlib.util.find_spec(name) is None
            for name in (REPORT_PACKAGES[t], *_ALSO_SERVES.get(t, ()))
        )
    ]
    if missing:
        raise PluginError(f"{WHO}: report_to = {list(targets)!r}: " + "; ".join(missing))
    return list(targets)


def add_report_callbacks(trainer: Any, report_to: Sequence[str], logs: Path) -> None:
    """With ``"tensorboard"`` in ``report_to``: log ``trainer``'s metrics as TensorBoard
    event files in ``logs`` (torch's SummaryWriter, else tensorboardX's)."""
    if "tensorboard" not in report_targets(report_to):
        return
    import importlib

    writer: Any
    try:  # torch's needs the tensorboard package
        writer = importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except ImportError:
        writer = importlib.import_module("tensorboardX").SummaryWriter
    callback: Any = importlib.import_module("transformers.integrations").TensorBoardCallback
    logs.mkdir(parents=True, exist_ok=True)
    trainer.add_callback(callback(tb_writer=writer(log_dir=str(logs))))


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer; a :class:`PluginError` unless it has a chat template."""
    try:
        tokenizer: Any = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"{WHO}: cannot load the tokenizer of {folder}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise PluginError(
            f"{WHO}: the tokenizer of {folder} has no chat template; SFT on conversations needs one"
        )
    return tokenizer


def load_model(folder: Path, dtype: torch.dtype) -> Any:
    """The checkpoint's causal LM in ``dtype``; a :class:`PluginError` if it cannot load."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"{WHO}: cannot load the policy model {folder}: {exc}") from exc


def lora_config(cfg: TorchOptimiserConfig) -> Any:
    """PEFT's LoRA config for ``cfg``'s ``lora_*`` settings."""
    import peft

    targets: str | list[str] = (
        "all-linear"
        if cfg.lora_target_modules == ("all-linear",)
        else list(cfg.lora_target_modules)
    )
    return peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def chat_turns(messages: Conversation) -> list[dict[str, str]]:
    """Messages as the role/content dicts chat templates and TRL take."""
    return [{"role": m.role, "content": m.content} for m in messages]


def as_conversation(turns: Any) -> Conversation:
    """TRL's prompt (a string or role/content dicts) as a caikit conversation."""
    if isinstance(turns, str):  # a plain-text prompt
        return (Message("user", turns),)
    return tuple(Message(str(t["role"]), str(t["content"])) for t in turns)


def score_samples(reward: PreferenceModel, samples: list[Sample]) -> list[float]:
    """``reward.score(samples)``, checked: one finite float per sample."""
    return checked_scores(reward.score, samples, WHO)


def sequence_kl(logs: dict[str, Any]) -> float | None:
    """Per-response KL from TRL's per-token mean ``kl`` and the mean completion length."""
    if "kl" not in logs or "completions/mean_length" not in logs:
        return None
    return float(logs["kl"]) * float(logs["completions/mean_length"])


class KLGuard(transformers.TrainerCallback):
    """Stops a TRL trainer once the per-response KL (:func:`sequence_kl`) exceeds ``bound``."""

    def __init__(self, bound: float | None) -> None:
        self.bound = bound
        #: ``(step, kl)`` of the step that went over the bound, if one did.
        self.tripped: tuple[int, float] | None = None

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        kl = sequence_kl(logs or {})
        if self.bound is None or kl is None or self.tripped is not None:
            return
        if kl > self.bound:
            self.tripped = (int(state.global_step), kl)
            control.should_training_stop = True


class RLRun:
    """One RL-CAI run (:meth:`TorchOptimiser.optimise`): its folders, device and record."""

    def __init__(
        self,
        config: TorchOptimiserConfig,
        policy: Path,
        reference: Path,
        device: str,
        out: Path,
        rollouts: RolloutGenerator | None = None,
    ) -> None:
        self.cfg = config
        self.policy, self.reference, self.device, self.out = policy, reference, device, out
        #: where rollouts are sampled (``rl.rollouts = "generator"``); None: in-process
        self.rollouts = rollouts
        #: every logged step (a TRL trainer's ``log_history``, or PPO's per-step metrics).
        self.history: list[dict[str, Any]] = []
        #: where resumable checkpoints are kept (``resumable``); None: none
        self.checkpoint_dir: Path | None = None

    # records ---------------------------------------------------------------------------
    def write_record(self, metrics: dict[str, float], stopped: str | None = None) -> None:
        """Write :data:`RL_RECORD` into ``out``."""
        record = {
            "algorithm": self.cfg.algorithm,
            "base": str(self.policy),
            "reference": str(self.reference),
            "config": attrs.asdict(self.cfg),
            "metrics": metrics,
            "stopped": stopped,
            "history": self.history,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        (self.out / RL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    # helpers --------------------------------------------------------------------------
    def fitting_prompts(
        self, prompts: Sequence[Prompt], max_length: int, max_new_tokens: int
    ) -> tuple[list[Prompt], int]:
        """The prompts whose chat-formatted tokens plus ``max_new_tokens`` fit ``max_length``.

        :raises CaikitError: no prompts, or none that fits.
        """
        cfg = self.cfg
        if not prompts:
            raise CaikitError(f"{WHO}: {cfg.algorithm} was given no prompts to train on")
        tokenizer = load_tokenizer(self.policy)
        room = max_length - max_new_tokens
        kept = []
        for p in prompts:
            ids = tokenizer.apply_chat_template(
                chat_turns(p.messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            if len(ids) <= room:
                kept.append(p)
        too_long = len(prompts) - len(kept)
        if too_long:
            log.warning(
                "%s: left out %d of %d prompts longer than max_length - max_new_tokens = %d tokens",
                cfg.algorithm,
                too_long,
                len(prompts),
                room,
            )
        if not kept:
            raise CaikitError(
                f"{WHO}: every one of the {len(prompts)} prompts is longer than max_length - "
                f"max_new_tokens = {room} tokens; raise max_length"
            )
        return kept, too_long

    def save(self, trained: Any, tokenizer: Any, use_cache: bool) -> None:
        """Save a plain checkpoint (LoRA merged) and the tokenizer into ``out`` (on the
        main process only, when training across processes)."""
        if not is_main_process():
            return
        if self.cfg.lora:
            trained = trained.merge_and_unload()
        if hasattr(trained.config, "use_cache"):
            trained.config.use_cache = use_cache
        trained.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)

    def release(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
