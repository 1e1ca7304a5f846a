"""``report_to``: a validated list of TRL reporting targets on the backend-neutral
policy-optimiser and preference-model settings, left out of fingerprints, honoured
by the torch trainers (a missing package is an error naming it), refused by jax."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from caikit_core.config import RoleRef
from caikit_core.converter import describe_error, structure
from caikit_core.errors import PluginError
from caikit_core.training.settings import (
    REPORT_TARGETS,
    PolicyOptimiserSettings,
    PreferenceModelSettings,
)


def _error(data: dict[str, Any], cls: type) -> str:
    try:
        structure(data, cls)
    except Exception as exc:  # cattrs' grouped errors, as config.resolve reports them
        return "\n".join(describe_error(exc))
    raise AssertionError(f"{data} was accepted")


@pytest.mark.parametrize("cls", [PolicyOptimiserSettings, PreferenceModelSettings])
def test_report_to_is_a_list_of_known_distinct_names(cls: type) -> None:
    assert REPORT_TARGETS == ("tensorboard", "trackio")
    assert structure({}, cls).report_to == ()
    assert structure({"report_to": ["trackio", "tensorboard"]}, cls).report_to == (
        "trackio",
        "tensorboard",
    )
    message = _error({"report_to": ["tensorboard", "wandb"]}, cls)
    assert "report_to" in message and "'tensorboard', 'trackio'" in message, message
    assert "wandb" in message
    assert "report_to" in _error({"report_to": ["trackio", "trackio"]}, cls)
    assert "report_to" in _error({"report_to": "tensorboard"}, cls)  # a list, not a string


def test_report_to_does_not_enter_fingerprints() -> None:
    plain = RoleRef("policy_optimiser", "torch", PolicyOptimiserSettings())
    reporting = RoleRef(
        "policy_optimiser", "torch", PolicyOptimiserSettings(report_to=("tensorboard",))
    )
    assert reporting.options()["report_to"] == ["tensorboard"]  # `caikit config show` has it
    assert "report_to" not in reporting.fingerprint_options()
    assert reporting.fingerprint_options() == plain.fingerprint_options()
    unfingerprinted = {"report_to", "checkpoint_every_steps", "checkpoint_every_minutes"}
    assert plain.fingerprint_options() == {
        k: v for k, v in plain.options().items() if k not in unfingerprinted
    }
    changed = RoleRef("policy_optimiser", "torch", PolicyOptimiserSettings(seed=1))
    assert changed.fingerprint_options() != plain.fingerprint_options()


def test_torch_trainers_get_report_to_or_an_error_naming_the_missing_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = pytest.importorskip("caikit_torch.common")
    assert common.trainer_defaults(seed=0, device="cpu", bf16=False)["report_to"] == "none"

    real = importlib.util.find_spec
    present = {"tensorboard", "trackio"}

    def find_spec(name: str, *args: Any) -> Any:
        if name in ("tensorboard", "tensorboardX", "trackio"):
            return object() if name in present else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    def report_to(*targets: str) -> Any:
        return common.trainer_defaults(seed=0, device="cpu", bf16=False, report_to=targets)[
            "report_to"
        ]

    # TensorBoard is added as a callback writing into the checkpoint (add_report_callbacks)
    assert report_to("tensorboard", "trackio") == ["trackio"]
    assert report_to("tensorboard") == "none"
    present.discard("trackio")
    with pytest.raises(PluginError, match=r"trackio needs the 'trackio' package"):
        report_to("tensorboard", "trackio")
    present.discard("tensorboard")
    with pytest.raises(PluginError, match=r"tensorboard needs the 'tensorboard' package"):
        report_to("tensorboard")
    present.add("tensorboardX")  # as transformers, tensorboardX serves too
    assert report_to("tensorboard") == "none"


def test_jax_refuses_report_to() -> None:
    config = pytest.importorskip("caikit_jax.config")
    for cls in (config.JaxOptimiserConfig, config.JaxPreferenceConfig):
        assert structure({}, cls).report_to == ()
        message = _error({"report_to": ["tensorboard"]}, cls)
        assert "report_to" in message and "no TRL trainer" in message, message
