"""Run files: parsing, validation messages, exit codes, resolved output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caikit_core.cli import main
from caikit_core.config import RunConfig, load_run
from caikit_core.plugins import get_registry
from tests.conftest import ECHO_RUN, run_cli

# Each case: (file name, content, expected message fragment).
BAD_CONFIGS = [
    ("syntax.toml", 'seed = \n[models]\npolicy = "x"', "invalid TOML: Invalid value (at line 1"),
    ("syntax.yaml", "seed: [1, 2\nmodels: {policy: x}\n", "invalid YAML: "),
    ("toplist.yaml", "- 1\n- 2\n", "(top level): expected a table, found [1, 2] (list)"),
    ("run.ini", "seed = 1", "unknown run file type '.ini' (expected .toml, .yaml, .yml)"),
    (
        "typo.toml",
        ECHO_RUN.replace("seed = 3", "seeed = 3"),
        "seeed: unknown key; did you mean 'seed'?",
    ),
    (
        "type.toml",
        ECHO_RUN.replace("seed = 3", 'seed = "3"'),
        "seed: expected an integer, found '3' (str)",
    ),
    (
        "plugin.toml",
        ECHO_RUN.replace('plugin = "echo"', 'plugin = "ecoh"'),
        "generator.plugin: unknown generator plugin 'ecoh'; did you mean 'echo'? (available: echo",
    ),
    (
        "missing-role.toml",
        ECHO_RUN.replace('[labeller]\nplugin = "length"\n', ""),
        "labeller: required by phase 'rl', found no [labeller] table "
        "(available plugins: cot, direct, length)",
    ),
    (
        "nested-type.toml",
        ECHO_RUN.replace("revisions = 2", 'revisions = "two"'),
        "critic.revisions: expected an integer, found 'two' (str)",
    ),
    (
        "nested-key.toml",
        ECHO_RUN.replace("revisions = 2", "revison = 2"),
        "critic.revison: unknown key; did you mean 'revisions'?",
    ),
    (
        "no-models.toml",
        ECHO_RUN.replace('[models]\npolicy = "echo-policy"\n', ""),
        "models: required key is missing",
    ),
    (
        "phase.toml",
        ECHO_RUN.replace('phases = ["sl", "rl"]', 'phases = ["sll"]'),
        "phases[0]: expected one of 'sl', 'rl', found 'sll' (str); did you mean 'sl'?",
    ),
    (
        "phase-str.toml",
        ECHO_RUN.replace('phases = ["sl", "rl"]', 'phases = "sl"'),
        "phases: expected a list, found 'sl' (str)",
    ),
    (
        "batch.toml",
        ECHO_RUN.replace("batch_size = 2", "batch_size = 0"),
        "batch_size: expected a positive integer, found 0",
    ),
    (
        "no-plugin-key.toml",
        ECHO_RUN.replace('[generator]\nplugin = "echo"', "[generator]\nprefix = 'x'"),
        "generator: expected a 'plugin' key naming the plugin, found none",
    ),
    (
        "no-settings.toml",
        ECHO_RUN.replace('plugin = "length"', 'plugin = "length"\nstrength = 2'),
        "labeller: plugin 'length' takes no settings, found strength",
    ),
    (
        "format.toml",
        ECHO_RUN.replace('prompts = "prompts.txt"', 'prompts = "prompts.txt"\nformat = "csv"'),
        "data.format: expected one of 'auto', 'jsonl', 'parquet', 'text', 'hh-rlhf', found 'csv'",
    ),
    (
        "top-p.toml",
        ECHO_RUN + "\n[sl.sampling]\ntop_p = 1.5\n",
        "sl.sampling.top_p: expected a number in (0, 1], found 1.5",
    ),
    (
        "sampling-key.toml",
        ECHO_RUN + "\n[rl.sampling]\ntemprature = 0.5\n",
        "rl.sampling.temprature: unknown key; did you mean 'temperature'?",
    ),
    (
        "models-scalar.toml",
        ECHO_RUN.replace('[models]\npolicy = "echo-policy"\n', 'models = "echo-policy"\n'),
        "models: expected a table, found 'echo-policy' (str)",
    ),
    (
        "bool.toml",
        ECHO_RUN + "\n[sl]\nsft = 1\n",
        "sl.sft: expected true or false, found 1 (int)",
    ),
    (
        "role-scalar.toml",
        "policy_optimiser = 3\n" + ECHO_RUN.replace('[policy_optimiser]\nplugin = "copy"\n', ""),
        "policy_optimiser: expected a table with a 'plugin' key, found 3 (int)",
    ),
    (
        "duplicate-phase.toml",
        ECHO_RUN.replace('phases = ["sl", "rl"]', 'phases = ["sl", "sl"]'),
        "phases: each phase may appear once, found ['sl', 'sl']",
    ),
    (
        "executor.toml",
        ECHO_RUN + '\n[executor]\nplugin = "locl"\n',
        "executor.plugin: unknown executor plugin 'locl'; did you mean 'local'? "
        "(available: local, ray)",
    ),
    ("missing.toml", None, "file not found"),
]


@pytest.mark.parametrize(
    ("name", "content", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_gives_one_clear_error_and_exit_2(
    name: str,
    content: str | None,
    expected: str,
    tmp_path: Path,
    with_echo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    for command in (["config", "show", str(path)], ["run", str(path)]):
        code = main(command)
        captured = capsys.readouterr()
        assert code == 2, captured
        assert expected in captured.err
        assert captured.err.startswith(f"error: {path}: ")
        assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_all_problems_are_reported_together(
    tmp_path: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ECHO_RUN.replace("seed = 3", 'seed = "x"').replace("batch_size = 2", "batchsize = 2")
    bad = bad.replace("revisions = 2", "revisions = 2.5")
    path = tmp_path / "many.toml"
    path.write_text(bad, encoding="utf-8")
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 config problems" in err
    assert "seed: expected an integer, found 'x' (str)" in err
    assert "batchsize: unknown key; did you mean 'batch_size'?" in err
    assert "critic.revisions: expected an integer, found 2.5 (float)" in err


def test_cli_subprocess_bad_config_has_no_traceback_unless_debug(
    tmp_path: Path, echo_site: Path
) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(ECHO_RUN.replace("seed = 3", "sed = 3"), encoding="utf-8")
    plain = run_cli("run", str(path), pythonpath=[echo_site])
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines()[-1] == "  sed: unknown key; did you mean 'seed'?"
    assert "Traceback" not in plain.stderr
    debug = run_cli("run", str(path), "--debug", pythonpath=[echo_site])
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr


def test_config_show_prints_every_default(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show", "--json", str(echo_run)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seed"] == 3
    assert data["phases"] == ["sl", "rl"]
    assert data["sl"] == {
        "sampling": {"max_new_tokens": 256, "temperature": 0.7, "top_p": 1.0},
        "sft": True,
        "helpfulness_prompts": None,
        "helpfulness_samples": 2,
    }
    assert data["generator"] == {"plugin": "echo", "prefix": "echo", "delay": 0.0, "fail_on": ""}
    assert data["critic"] == {"plugin": "shout", "revisions": 2}
    assert data["labeller"] == {"plugin": "length"}
    assert data["executor"] == {"plugin": "local", "progress": True}
    assert data["constitution"] == {"path": "default", "format": "auto"}
    assert main(["config", "show", str(echo_run)]) == 0
    yaml_out = capsys.readouterr().out
    assert "plugin: shout\n  revisions: 2\n" in yaml_out


def test_yaml_and_toml_resolve_to_the_same_config(tmp_path: Path, with_echo: Path) -> None:
    import tomllib

    import yaml

    toml_path = tmp_path / "a.toml"
    toml_path.write_text(ECHO_RUN, encoding="utf-8")
    yaml_path = tmp_path / "a.yaml"
    yaml_path.write_text(yaml.safe_dump(tomllib.loads(ECHO_RUN)), encoding="utf-8")
    registry = get_registry()
    a, b = load_run(toml_path, registry), load_run(yaml_path, registry)
    assert a.as_dict() == b.as_dict()
    assert isinstance(a.config, RunConfig)


def test_yaml_is_loaded_safely(
    tmp_path: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "unsafe.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "python/object/apply" in err


def test_optimiser_without_the_needed_capability_is_refused(
    tmp_path: Path, with_echo: Path
) -> None:
    import types

    from caikit_core import hookimpl, plugins
    from caikit_core.errors import ConfigError

    @hookimpl
    def register_policy_optimisers(register):  # type: ignore[no-untyped-def]
        register("sft-only", lambda config: None, capabilities={"sft"})

    module = types.ModuleType("sft_only")
    module.register_policy_optimisers = register_policy_optimisers  # type: ignore[attr-defined]
    manager = plugins.PluginManager()
    manager.load_entry_points()
    manager.register(module, "sft-only", distribution="caikit-sft-only", version="1")
    path = tmp_path / "rl.toml"
    path.write_text(ECHO_RUN.replace('plugin = "copy"', 'plugin = "sft-only"'), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_run(path, manager.registry)
    assert err.value.problems == [
        "policy_optimiser.plugin: 'sft-only' cannot optimise a policy (needs 'ppo' or "
        "'preference-loss'; it has: sft), which rl.train_policy = true needs"
    ]
    path.write_text(
        ECHO_RUN.replace('plugin = "copy"', 'plugin = "sft-only"').replace(
            'phases = ["sl", "rl"]', 'phases = ["sl"]'
        ),
        encoding="utf-8",
    )
    assert load_run(path, manager.registry).roles["policy_optimiser"].spec.name == "sft-only"


def _neutral_manager() -> object:
    """A plugin manager with the fixture plugins and an optimiser taking the core's
    backend-neutral settings (:class:`PolicyOptimiserSettings`), as torch and jax do."""
    import types

    from caikit_core import hookimpl, plugins
    from caikit_core.training.settings import PolicyOptimiserSettings

    @hookimpl
    def register_policy_optimisers(register):  # type: ignore[no-untyped-def]
        register(
            "neutral",
            lambda config: None,
            config=PolicyOptimiserSettings,
            capabilities={"sft", "ppo"},
        )

    module = types.ModuleType("neutral")
    module.register_policy_optimisers = register_policy_optimisers  # type: ignore[attr-defined]
    manager = plugins.PluginManager()
    manager.load_entry_points()
    manager.register(module, "neutral", distribution="caikit-neutral", version="1")
    return manager


def test_old_flat_optimiser_keys_say_where_they_moved(tmp_path: Path, with_echo: Path) -> None:
    from caikit_core.errors import ConfigError

    manager = _neutral_manager()
    path = tmp_path / "old.toml"
    old = 'plugin = "neutral"\nppo_steps = 4\nsft_target = "all"\nepochs = 2\n'
    path.write_text(ECHO_RUN.replace('plugin = "copy"\n', old), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_run(path, manager.registry)  # type: ignore[attr-defined]
    assert err.value.problems == [
        "policy_optimiser.ppo_steps: moved to policy_optimiser.ppo.steps, "
        "policy_optimiser.rloo.steps, policy_optimiser.grpo.steps",
        "policy_optimiser.sft_target: moved to policy_optimiser.sft.target",
        "policy_optimiser.epochs: moved to policy_optimiser.sft.epochs, "
        "policy_optimiser.dpo.epochs",
    ]


def test_each_algorithm_has_its_own_table(tmp_path: Path, with_echo: Path) -> None:
    from caikit_core.errors import ConfigError

    manager = _neutral_manager()
    tables = (
        'plugin = "neutral"\n\n[policy_optimiser.sft]\nlearning_rate = 1e-4\n\n'
        "[policy_optimiser.ppo]\nlearning_rate = 3e-6\nsteps = 2\n\n"
        "[policy_optimiser.dpo]\nbeta = 0.1\n"
    )
    path = tmp_path / "new.toml"
    path.write_text(ECHO_RUN.replace('plugin = "copy"\n', tables), encoding="utf-8")
    role = load_run(path, manager.registry).roles["policy_optimiser"]  # type: ignore[attr-defined]
    config = role.config
    assert (config.sft.learning_rate, config.ppo.learning_rate) == (1e-4, 3e-6)
    assert config.ppo.steps == 2 and config.dpo.beta == 0.1 and config.ppo.kl_coef == 0.05
    options = role.ref.fingerprint_options()  # what enters the optimiser stages' fingerprints
    assert options["sft"]["learning_rate"] == 1e-4 and options["ppo"]["steps"] == 2
    assert sorted(options) == ["algorithm", "dpo", "grpo", "ppo", "rloo", "seed", "sft"]
    assert role.options()["report_to"] == []  # shown (config show), never fingerprinted
    path.write_text(
        ECHO_RUN.replace('plugin = "copy"\n', tables.replace("steps = 2", "steps = 0")),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_run(path, manager.registry)  # type: ignore[attr-defined]
    assert err.value.problems == [
        "policy_optimiser.ppo.steps: expected a positive integer, found 0"
    ]


def test_rollouts_from_the_generator_need_both_capabilities(
    tmp_path: Path, with_echo: Path
) -> None:
    """rl.rollouts = "generator" is refused at load unless the optimiser takes rollouts
    from a generator and the generator can give them; the default asks nothing."""
    from caikit_core.errors import ConfigError

    manager = _neutral_manager()
    path = tmp_path / "rollouts.toml"
    run = ECHO_RUN.replace('plugin = "copy"\n', 'plugin = "neutral"\n')
    path.write_text(run, encoding="utf-8")
    assert load_run(path, manager.registry).config.rl.rollouts == "optimiser"  # type: ignore[attr-defined]
    asked = run + '\n[rl]\nrollouts = "generator"\n'
    path.write_text(asked, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_run(path, manager.registry)  # type: ignore[attr-defined]
    assert err.value.problems == [
        "rl.rollouts: 'generator' needs a policy optimiser that takes rollouts from a "
        "generator ('generator-rollouts' capability); 'neutral' samples its own: set "
        'rl.rollouts = "optimiser"',
        "rl.rollouts: 'generator' needs a generator with the 'rollouts' capability; "
        "generator.plugin 'echo' has none",
    ]
    path.write_text(asked.replace('"generator"', '"engine"'), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_run(path, manager.registry)  # type: ignore[attr-defined]
    assert any("rl.rollouts" in p and "'optimiser', 'generator'" in p for p in err.value.problems)


def test_the_bundled_hf_and_torch_plugins_take_rollouts_from_the_generator(
    tmp_path: Path,
) -> None:
    """The quickstart with rl.rollouts = "generator" loads with hf (and vllm) and torch;
    the jax optimiser samples its own rollouts and is refused."""
    from caikit_core.errors import ConfigError

    root = Path(__file__).resolve().parents[1]
    text = (root / "examples" / "quickstart.toml").read_text(encoding="utf-8")
    text = text.replace('output_dir = "../runs/quickstart"', f'output_dir = "{tmp_path / "out"}"')
    text = text.replace(
        'prompts = "prompts.jsonl"', f'prompts = "{root / "examples" / "prompts.jsonl"}"'
    )
    path = tmp_path / "rollouts.toml"
    for generator in ("hf", "vllm"):
        body = text.replace('[generator]\nplugin = "hf"', f'[generator]\nplugin = "{generator}"')
        path.write_text(body + '\n[rl]\nrollouts = "generator"\n', encoding="utf-8")
        try:
            run = load_run(path, get_registry())
        except ConfigError as err:  # vllm where it is not installed: only its preflight
            assert generator == "vllm", err.problems
            assert [p.split(":")[0] for p in err.problems] == ["generator.plugin"]
            continue
        assert run.config.rl.rollouts == "generator"
    jax = text.replace('[policy_optimiser]\nplugin = "torch"', '[policy_optimiser]\nplugin = "jax"')
    path.write_text(jax + '\n[rl]\nrollouts = "generator"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_run(path, get_registry())
    assert err.value.problems == [
        "rl.rollouts: 'generator' needs a policy optimiser that takes rollouts from a "
        "generator ('generator-rollouts' capability); 'jax' samples its own: set "
        'rl.rollouts = "optimiser"'
    ]
