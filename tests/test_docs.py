"""The docs keep up with the code: every hook and config key is documented, and
the hook examples run."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from pathlib import Path

import attrs
import pytest

from caikit_core import cli, hookspecs, plugins
from caikit_core.config import RunConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = [
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if getattr(fn, "caikit_spec", None) is not None
]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_every_role_has_a_hook() -> None:
    assert sorted(HOOKS) == sorted(plugins.HOOKS)
    assert set(plugins.ROLE_HOOKS.values()) <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_signature_and_docstring(hook: str) -> None:
    sections = _sections((DOCS / "plugin-hooks.md").read_text(encoding="utf-8"))
    assert hook in sections, f"docs/plugin-hooks.md has no '## {hook}' section"
    fn = getattr(hookspecs, hook)
    signature = f"{hook}(register: {fn.__annotations__['register']}) -> None"
    assert signature in sections[hook]
    doc = inspect.getdoc(fn) or ""
    assert ":param register:" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_example_runs_and_registers(hook: str, capsys: pytest.CaptureFixture[str]) -> None:
    section = _sections((DOCS / "plugin-hooks.md").read_text(encoding="utf-8"))[hook]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"{hook}: expected one python example"
    module = types.ModuleType(f"example_{hook}")
    exec(compile(blocks[0], f"docs/plugin-hooks.md#{hook}", "exec"), module.__dict__)
    manager = plugins.PluginManager()
    manager.register(module, f"example-{hook}", distribution="docs-example", version="0")
    if hook == "register_commands":
        _check_commands_example(manager, capsys)
        return
    role = next(r for r, h in plugins.KIND_HOOKS.items() if h == hook)
    names = manager.registry.names(role)
    assert len(names) == 1
    spec = manager.registry.get(role, names[0])
    assert spec.distribution == "docs-example"


def _check_commands_example(
    manager: plugins.PluginManager, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli.build_parser(manager)
    args = parser.parse_args(["demo", "greet", "Ada", "--loud", "-q"])
    assert args.quiet and args.func(args) == 0
    assert json.loads(capsys.readouterr().out) == {"greeting": "hello, Ada", "loud": True}


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        if attrs.has(tp) and field.name not in plugins.ROLES:
            out.extend(_keys(tp, f"{key}."))
        else:
            out.append(key)
    return out


def test_every_config_key_is_in_the_reference() -> None:
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    missing = [k for k in _keys(RunConfig) if f"`{k}`" not in text]
    assert missing == []


def test_every_bundled_plugin_and_key_is_documented() -> None:
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    sections = _sections(text)
    bundled = [s for s in plugins.get_registry().all() if s.bundled]
    assert bundled
    for spec in bundled:
        title = f"{spec.role} `{spec.name}`"
        assert title in sections, f"docs/plugins.md has no '## {title}' section"
        if spec.config_cls is not None:
            for field in attrs.fields(spec.config_cls):
                assert f"| `{field.name}` |" in sections[title], (spec.name, field.name)
