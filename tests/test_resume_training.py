"""Resumable training, the core's side: a fit stage's plugin with the ``resumable``
capability gets ``checkpoint_dir=`` (the stage folder's ``checkpoints/``, which a
kill does not lose), a rerun after a failed fit hands it the same folder, and the
folder is removed once the stage is complete; a plugin without the capability is
called as before (docs/reliability.md#resumable-training)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from caikit_core import hookimpl, plugins
from caikit_core.config import load_run
from caikit_core.interfaces import ALL_CAPABILITIES, RESUMABLE
from caikit_core.runner import Runner
from caikit_core.training import checkpoints as core_checkpoints


def test_resumable_is_a_known_capability() -> None:
    assert RESUMABLE == "resumable"
    assert RESUMABLE in ALL_CAPABILITIES


def test_a_resumable_fit_gets_a_persistent_checkpoint_folder_and_resumes_from_it(
    echo_run: Path, with_echo: Path
) -> None:
    from caikit_echo.plugin import CopyOptimiser

    calls: list[dict[str, Any]] = []

    class ResumableCopy(CopyOptimiser):  # type: ignore[misc]
        capabilities = frozenset({"sft", "ppo", RESUMABLE})

        def sft(self, policy: str, examples: Any, out: Path, **kw: Any) -> Any:
            folder: Path = kw["checkpoint_dir"]
            calls.append({"stage": "sft", "folder": folder, "resumed": (folder / "step").exists()})
            if not (folder / "step").exists():
                (folder / "step").write_text("3")  # a checkpoint, then the "kill"
                raise RuntimeError("killed at step 3")
            return super().sft(policy, examples, out)

        def optimise(self, *args: Any, **kw: Any) -> Any:
            calls.append({"stage": "policy", "folder": kw.get("checkpoint_dir")})
            return super().optimise(*args)

    @hookimpl
    def register_policy_optimisers(register):  # type: ignore[no-untyped-def]
        register(
            "resumable-copy",
            lambda config: ResumableCopy(config),
            capabilities={"sft", "ppo", RESUMABLE},
        )

    module = types.ModuleType("resumable")
    module.register_policy_optimisers = register_policy_optimisers  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(
        module, "resumable", distribution="resumable", version="1"
    )
    echo_run.write_text(
        echo_run.read_text().replace('plugin = "copy"', 'plugin = "resumable-copy"')
    )
    with pytest.raises(Exception, match="killed at step 3"):
        Runner(load_run(echo_run, plugins.get_registry())).execute()
    first = calls[-1]["folder"]
    assert first.name == "checkpoints" and first.parent.parent.name == "sft"
    assert (first / "step").read_text() == "3"  # survived the failed fit
    summary = Runner(load_run(echo_run, plugins.get_registry())).execute()
    sft_calls = [c for c in calls if c["stage"] == "sft"]
    assert [c["resumed"] for c in sft_calls] == [False, True]
    assert sft_calls[1]["folder"] == first
    assert not first.exists()  # complete: its checkpoints are removed
    assert summary.stage("sft").artifact is not None
    policy_folder = next(c["folder"] for c in calls if c["stage"] == "policy")
    assert policy_folder == summary.stage("policy").path / "checkpoints"
    assert not policy_folder.exists()


def test_a_plugin_without_the_capability_gets_no_checkpoint_dir(
    echo_run: Path, with_echo: Path
) -> None:
    """caikit-echo's ``copy`` optimiser takes no keywords: the run works as before."""
    summary = Runner(load_run(echo_run, plugins.get_registry())).execute()
    assert summary.stage("sft").status == "ran"
    assert not (summary.stage("sft").path / "checkpoints").exists()


def test_checkpoint_settings_do_not_enter_fingerprints() -> None:
    from caikit_core.config import RoleRef
    from caikit_core.converter import InvalidValue
    from caikit_core.training.settings import (
        CHECKPOINT_EVERY_MINUTES,
        PolicyOptimiserSettings,
        PreferenceModelSettings,
    )

    for role, cls in (
        ("policy_optimiser", PolicyOptimiserSettings),
        ("preference_model", PreferenceModelSettings),
    ):
        plain = RoleRef(role, "torch", cls())
        assert cls().checkpoint_every_steps is None
        assert cls().checkpoint_every_minutes == CHECKPOINT_EVERY_MINUTES == 30.0
        often = RoleRef(role, "torch", cls(checkpoint_every_steps=5, checkpoint_every_minutes=None))
        assert often.options()["checkpoint_every_steps"] == 5
        assert often.fingerprint_options() == plain.fingerprint_options()
        assert "checkpoint_every_steps" not in plain.fingerprint_options()
        with pytest.raises(InvalidValue, match="positive integer or nothing, found 0") as info:
            cls(checkpoint_every_steps=0)
        assert info.value.field == "checkpoint_every_steps"
        with pytest.raises(InvalidValue, match="found -1") as info:
            cls(checkpoint_every_minutes=-1.0)
        assert info.value.field == "checkpoint_every_minutes"


def test_the_schedule_saves_every_n_steps_or_after_m_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(core_checkpoints.time, "monotonic", lambda: now[0])
    by_steps = core_checkpoints.Schedule(3, None)
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = core_checkpoints.Schedule(None, 30.0)
    assert not by_time.due(1)
    now[0] += 30 * 60 - 1
    assert not by_time.due(2)
    now[0] += 1
    assert by_time.due(3)
    by_time.saved()
    assert not by_time.due(4)
    assert not any(core_checkpoints.Schedule(None, None).due(s) for s in range(1, 5))
