"""The conformance kit builds a plugin with the quick settings the plugin registered
(``register(..., check_settings={...})``), not with a table in the core."""

from __future__ import annotations

import types
from typing import Any

import attrs
import pytest

from caikit_core import hookimpl, plugins
from caikit_core.errors import PluginError
from caikit_core.testing import kit
from caikit_core.testing.kit import make_context


@attrs.frozen
class Inner:
    steps: int = 8
    rate: float = 0.1


@attrs.frozen
class QuickConfig:
    size: int = 100
    device: str = "auto"
    inner: Inner = attrs.field(factory=Inner)


class Quick:
    def __init__(self, config: QuickConfig) -> None:
        self.config = config


def _manager(check_settings: Any) -> plugins.PluginManager:
    @hookimpl
    def register_preference_models(register):  # type: ignore[no-untyped-def]
        register(
            "quick",
            lambda config, model: Quick(config),
            config=QuickConfig,
            check_settings=check_settings,
        )

    module = types.ModuleType("quick")
    module.register_preference_models = register_preference_models  # type: ignore[attr-defined]
    manager = plugins.PluginManager()
    manager.register(module, "quick", distribution="caikit-quick", version="1")
    return manager


def test_the_registered_check_settings_are_on_the_spec_and_used_by_the_kit() -> None:
    manager = _manager({"size": 2, "device": "cpu", "inner": {"steps": 1}})
    spec = manager.registry.get("preference_model", "quick")
    assert spec.check_settings == {"size": 2, "device": "cpu", "inner": {"steps": 1}}
    ctx = make_context("preference_model", spec)
    assert ctx.config == QuickConfig(size=2, device="cpu", inner=Inner(steps=1))
    # a caller's settings are laid over them, nested tables key by key
    ctx = make_context("preference_model", spec, config={"inner": {"rate": 0.5}})
    assert ctx.config == QuickConfig(size=2, device="cpu", inner=Inner(steps=1, rate=0.5))


def test_without_check_settings_the_kit_uses_the_defaults() -> None:
    spec = _manager(None).registry.get("preference_model", "quick")
    assert spec.check_settings is None
    assert make_context("preference_model", spec).config == QuickConfig()


def test_check_settings_must_be_a_table() -> None:
    with pytest.raises(PluginError, match=r"check_settings for preference_model 'quick' must be"):
        _manager(["size", 2]).registry.get("preference_model", "quick")


def test_the_core_names_no_bundled_plugin_settings() -> None:
    assert not hasattr(kit, "KIT_CONFIGS")


@pytest.mark.parametrize(
    ("role", "name", "key"),
    [
        ("generator", "hf", "device"),
        ("generator", "vllm", "enforce_eager"),
        ("critic", "constitutional", "revisions"),
        ("labeller", "cot", "max_new_tokens"),
        ("preference_model", "torch", "max_length"),
        ("policy_optimiser", "torch", "sft"),
        ("preference_model", "jax", "batch_size"),
        ("policy_optimiser", "jax", "sft"),
    ],
)
def test_bundled_plugins_register_quick_settings_their_config_accepts(
    role: str, name: str, key: str
) -> None:
    from caikit_core.converter import structure

    registry = plugins.get_registry()
    if name not in registry.names(role):
        pytest.skip(f"the bundled {role} '{name}' is not installed")
    spec = registry.get(role, name)
    assert spec.check_settings is not None and key in spec.check_settings
    assert spec.config_cls is not None
    structure(dict(spec.check_settings), spec.config_cls)  # valid as a run file's table
