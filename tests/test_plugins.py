"""The plugin manager: entry points, allow-list, tracing, validation, listing."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from caikit_core import hookimpl, plugins
from caikit_core.errors import PluginError
from tests.conftest import run_cli


def test_fixture_distribution_loads_through_its_entry_point(echo_site: Path) -> None:
    result = run_cli("plugins", "--json", pythonpath=[echo_site])
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_role = {(r["role"], r["name"]): r for r in rows}
    assert set(by_role) == {
        ("generator", "echo"),
        ("critic", "shout"),
        ("labeller", "length"),
        ("preference_model", "wordcount"),
        ("policy_optimiser", "copy"),
    }
    echo = by_role[("generator", "echo")]
    assert echo["distribution"] == "caikit-echo"
    assert echo["version"] == "0.0.1"
    assert echo["plugin"] == "echo"
    assert echo["capabilities"] == ["score", "seeded"]
    assert echo["config"] == "EchoConfig"


def test_plugins_all_includes_bundled(echo_site: Path) -> None:
    rows = json.loads(run_cli("plugins", "--all", "--json", pythonpath=[echo_site]).stdout)
    bundled = {(r["role"], r["name"]) for r in rows if r["distribution"] == "caikit"}
    assert ("executor", "local") in bundled
    assert ("generator", "echo") in {(r["role"], r["name"]) for r in rows}


def test_plugins_table_output(echo_site: Path) -> None:
    result = run_cli("plugins", "--all", pythonpath=[echo_site])
    assert result.returncode == 0
    assert "caikit-echo" in result.stdout and "local" in result.stdout
    assert "executor" in result.stdout


def test_allow_list_limits_entry_points(echo_site: Path) -> None:
    none = run_cli(
        "plugins", "--all", "--json", pythonpath=[echo_site], env_extra={"CAIKIT_LOAD_PLUGINS": ""}
    )
    assert json.loads(none.stdout) == []
    only_local = run_cli(
        "plugins",
        "--all",
        "--json",
        pythonpath=[echo_site],
        env_extra={"CAIKIT_LOAD_PLUGINS": "local"},
    )
    assert [(r["role"], r["name"]) for r in json.loads(only_local.stdout)] == [
        ("executor", "local")
    ]
    only_echo = run_cli(
        "plugins",
        "--all",
        "--json",
        pythonpath=[echo_site],
        env_extra={"CAIKIT_LOAD_PLUGINS": " echo ,"},
    )
    assert {r["distribution"] for r in json.loads(only_echo.stdout)} == {"caikit-echo"}


def test_trace_prints_every_hook_call_with_arguments_and_results(echo_site: Path) -> None:
    result = run_cli(
        "plugins", "--json", pythonpath=[echo_site], env_extra={"CAIKIT_TRACE_PLUGINS": "1"}
    )
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    calls = [line for line in lines if "register_generators(register=" in line]
    assert calls and "impls [echo]" in "\n".join(calls)
    assert any(line.startswith("caikit trace: register_generators result: [") for line in lines)
    assert (
        "caikit trace: registered generator 'echo' from plugin 'echo' from distribution "
        "'caikit-echo' 0.0.1" in result.stderr
    )
    quiet = run_cli("plugins", "--json", pythonpath=[echo_site])
    assert "caikit trace" not in quiet.stderr


def test_same_name_twice_names_both_distributions(echo_site: Path, clash_site: Path) -> None:
    result = run_cli("plugins", pythonpath=[echo_site, clash_site])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "two plugins register the generator name 'echo'" in result.stderr
    assert "distribution 'caikit-echo' 0.0.1" in result.stderr
    assert "distribution 'caikit-echo-clash' 0.0.2" in result.stderr


def _module(name: str, **attrs_: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs_.items():
        setattr(mod, key, value)
    return mod


def test_signature_mismatch_names_plugin_and_distribution() -> None:
    @hookimpl
    def register_labellers(register, extra):  # type: ignore[no-untyped-def]
        pass

    pm = plugins.PluginManager()
    with pytest.raises(PluginError) as err:
        pm.register(
            _module("bad", register_labellers=register_labellers),
            "bad",
            distribution="caikit-bad",
            version="1.2",
        )
    msg = str(err.value)
    assert "plugin 'bad' from distribution 'caikit-bad' 1.2 is invalid" in msg
    assert "extra" in msg


def test_unknown_hook_name_suggests_the_right_one() -> None:
    @hookimpl
    def register_labeller(register):  # type: ignore[no-untyped-def]
        pass

    pm = plugins.PluginManager()
    with pytest.raises(PluginError) as err:
        pm.register(
            _module("typo", register_labeller=register_labeller),
            "typo",
            distribution="caikit-typo",
            version="0.1",
        )
    assert "implements unknown hook 'register_labeller'; did you mean 'register_labellers'?" in str(
        err.value
    )


def test_registration_errors_name_the_plugin() -> None:
    @hookimpl
    def register_generators(register):  # type: ignore[no-untyped-def]
        register("g", lambda c, *, model: None, capabilities={"teleport"})

    pm = plugins.PluginManager()
    pm.register(
        _module("caps", register_generators=register_generators),
        "caps",
        distribution="caikit-caps",
        version="3",
    )
    with pytest.raises(PluginError) as err:
        _ = pm.registry
    assert "plugin 'caps' from distribution 'caikit-caps' 3" in str(err.value)
    assert "unknown capabilities ['teleport']" in str(err.value)

    @hookimpl
    def register_critics(register):  # type: ignore[no-untyped-def]
        register("c", lambda c: None, config=dict)

    pm2 = plugins.PluginManager()
    pm2.register(_module("cfg", register_critics=register_critics), "cfg")
    with pytest.raises(PluginError, match="config for critic 'c' must be an attrs class"):
        _ = pm2.registry


def test_impl_may_take_fewer_arguments_and_in_process_registration() -> None:
    @attrs.frozen
    class Cfg:
        x: int = 1

    @hookimpl
    def register_executors(register):  # type: ignore[no-untyped-def]
        register("inline", lambda config: config, config=Cfg)

    pm = plugins.PluginManager()
    pm.register(_module("inline", register_executors=register_executors), "inline")
    spec = pm.registry.get("executor", "inline")
    assert spec.config_cls is Cfg
    assert spec.build(Cfg(x=5)) == Cfg(x=5)
    with pytest.raises(
        PluginError, match=r"unknown executor plugin 'inlin'; did you mean 'inline'"
    ):
        pm.registry.get("executor", "inlin")


def test_import_is_light() -> None:
    code = (
        "import sys, json\n"
        "import caikit_core, caikit_core.cli, caikit_core.config, caikit_core.runner\n"
        "import caikit_core.store, caikit_core.plugins, caikit_core.records\n"
        "from caikit_core.plugins import get_registry\n"
        "get_registry()\n"
        "heavy = ['torch', 'jax', 'vllm', 'ray', 'transformers', 'tensorflow', 'flax']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def _add_commands(**hooks: object) -> None:
    """Register an in-process plugin ``cmds`` with the process-wide manager."""
    plugins.get_plugin_manager().register(_module("cmds", **hooks), "cmds")


def test_register_commands_adds_commands_and_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from caikit_core import cli
    from caikit_core.errors import CaikitError

    def count(args):  # type: ignore[no-untyped-def]
        if args.n < 0:
            raise CaikitError(f"count: expected a number >= 0, found {args.n}")
        print(" ".join(str(i) for i in range(args.n)))
        return 0

    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        tools = register("tools", help="tools of the cmds plugin", description="Tools.")
        register("count", count, parent=tools, help="count to N").add_argument("n", type=int)

    _add_commands(register_commands=register_commands)
    assert cli.main(["tools", "count", "3"]) == 0
    assert capsys.readouterr().out == "0 1 2\n"
    assert cli.main(["tools", "count", "--", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: count: expected a number >= 0, found -1\n"
    assert captured.out == ""
    with pytest.raises(SystemExit) as exited:  # a group needs its sub-command
        cli.main(["tools"])
    assert exited.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["tools", "--help"])
    assert "Tools." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "parent", "message"),
    [
        ("plugins", False, "adds the command 'caikit plugins', which exists already"),
        ("models", False, "adds the command 'caikit models', which exists already"),
        ("-x", False, "a command name must be a word, got '-x'"),
        ("sub", True, "parent= of command 'sub' is not one it registered"),
    ],
)
def test_register_commands_errors_name_the_plugin(
    name: str, parent: bool, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from caikit_core import cli

    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        register(
            name, lambda args: 0, help="h", parent=argparse.ArgumentParser() if parent else None
        )

    _add_commands(register_commands=register_commands)
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plugin 'cmds' from distribution '<in-process>'")
    assert message in err and "Traceback" not in err


def test_register_commands_failure_names_the_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    from caikit_core import cli

    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    _add_commands(register_commands=register_commands)
    assert cli.main(["--debug", "plugins"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: plugin 'cmds' from distribution '<in-process>' failed in register_commands" in err
    )
    assert "RuntimeError: boom" in err and "Traceback" in err  # --debug shows it


@pytest.fixture
def caikit_logger() -> Iterator[None]:
    """Restore the ``caikit`` logger that ``cli.main`` configures."""
    import logging

    logger = logging.getLogger("caikit")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("caikit_logger")
@pytest.mark.parametrize("quiet", [False, True])
def test_plugin_log_records_reach_the_cli_handler(
    quiet: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from caikit_core import cli

    def chat(args):  # type: ignore[no-untyped-def]
        log = logging.getLogger("caikit.cmds")
        log.debug("cmds debug line")
        log.info("cmds info line")
        log.warning("cmds warning line")
        return 0

    @hookimpl
    def register_commands(register):  # type: ignore[no-untyped-def]
        register("chat", chat, help="log three lines")

    _add_commands(register_commands=register_commands)
    assert cli.main(["chat", "-q"] if quiet else ["chat"]) == 0
    err = capsys.readouterr().err
    assert "cmds warning line" in err
    assert ("cmds info line" in err) is not quiet
    assert "cmds debug line" not in err


def test_core_and_bundled_plugins_log_under_caikit() -> None:
    """The CLI configures the ``caikit`` logger only, so every logger is ``caikit.<name>``."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("caikit_core/**/*.py"), *root.glob("plugins/*/*.py")]
    sources += root.glob("contrib/*/*/*.py")
    names = {
        (path.relative_to(root).as_posix(), name)
        for path in sources
        for name in re.findall(r"getLogger\(([^)]*)\)", path.read_text(encoding="utf-8"))
    }
    assert names
    bad = {(path, name) for path, name in names if not re.fullmatch(r'"caikit(\.\w+)?"', name)}
    assert bad == set()
