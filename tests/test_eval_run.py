"""``[eval]`` in a run file and ``caikit eval NAME --run RUN_DIR`` on the echo fixture
plugins (no model): resolved at load, refused before anything runs, results found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caikit_core import cli, plugins
from caikit_core.config import load_run
from caikit_core.errors import ConfigError
from caikit_core.evaluation import find_results, read_result
from tests.shared import ensure_bundled


@pytest.fixture
def echo_eval(with_echo: Path) -> None:
    ensure_bundled("eval")


def test_eval_table_is_resolved_at_load_with_every_problem(echo_run: Path, echo_eval: None) -> None:
    text = echo_run.read_text()
    echo_run.write_text(
        text + '\n[eval]\ninstruments = ["hhh", "hhhh"]\n\n[eval.hhh]\nlimt = 3\n'
        "\n[eval.position-bias]\nbins = 0\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_run(echo_run, plugins.get_registry())
    problems = caught.value.problems
    assert "eval.hhh.limt: unknown key; did you mean 'limit'?" in problems
    assert any(p.startswith("eval.instruments: unknown instrument plugin 'hhhh'") for p in problems)
    assert any(p.startswith("eval.position-bias.bins: ") for p in problems)


def test_config_show_writes_eval_as_a_run_file_does(
    echo_run: Path, echo_eval: None, capsys: pytest.CaptureFixture[str]
) -> None:
    echo_run.write_text(
        echo_run.read_text() + '\n[eval]\ninstruments = ["hhh"]\n\n[eval.hhh]\nlimit = 3\n',
        encoding="utf-8",
    )
    assert cli.main(["config", "show", str(echo_run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["eval"]
    assert shown["instruments"] == ["hhh"] and shown["hhh"]["limit"] == 3
    assert shown["hhh"]["rounds"] == 1000  # defaults filled in
    echo_run.write_text(echo_run.read_text().split("\n[eval]")[0], encoding="utf-8")
    assert cli.main(["config", "show", str(echo_run), "--json"]) == 0
    assert "eval" not in json.loads(capsys.readouterr().out)


def test_eval_on_a_run_directory_uses_its_preference_model_and_is_found(
    echo_run: Path, echo_eval: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = echo_run.parent / "out"
    argv = ["eval", "hhh", "--run", str(run_dir), "--set", "preference_model=true"]
    assert cli.main([*argv, "-q"]) == 2  # no run yet
    assert "no run.json" in capsys.readouterr().err
    assert cli.main(["run", str(echo_run), "-q"]) == 0
    capsys.readouterr()
    code = cli.main([*argv, "--set", "limit=3", "--set", "rounds=20", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"hhh: {run_dir / 'eval' / 'hhh' / 'result.json'}" in out
    assert "  preference_model/accuracy: " in out and "(90% bootstrap, n=3)" in out
    found = find_results(run_dir)
    assert found == {"hhh": run_dir / "eval" / "hhh"}
    assert read_result(found["hhh"]).rows[0]["labeller"] == "length"


def test_eval_refuses_a_preference_model_the_run_does_not_have(
    echo_run: Path, echo_eval: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["eval", "hhh", "--config", str(echo_run), "--set", "preference_model=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: instrument 'hhh' needs preference model, which this run lacks")
    assert "--preference-model PATH" in err


def test_the_context_builds_the_runs_roles_on_its_checkpoints(
    echo_run: Path, echo_eval: None
) -> None:
    from caikit_core.eval_context import RunEvalContext, run_artifacts
    from caikit_core.runner import Runner
    from caikit_core.store import RunStore

    echo_run.write_text(
        echo_run.read_text() + '\n[eval]\ncheckpoints = { other = "elsewhere" }\n',
        encoding="utf-8",
    )
    run = load_run(echo_run, plugins.get_registry())
    Runner(run).execute()
    artifacts = run_artifacts(RunStore(run.output_path()))
    assert sorted(artifacts) == ["policy", "preference_model", "sft"]
    ctx = RunEvalContext(run, run_dir=run.output_path(), artifacts=artifacts)
    assert dict(ctx.checkpoints) == {
        "base": "echo-policy",
        "sl": str(artifacts["sft"]),
        "rl": str(artifacts["policy"]),
        "other": "elsewhere",
    }
    assert ctx.generator("sl").model == str(artifacts["sft"])  # a checkpoint by name
    assert ctx.generator("base").model == "echo-policy"
    assert type(ctx.labeller()).__name__ == "LengthLabeller"
    assert ctx.preference_model().weight in (1.0, -1.0)  # loaded from the trained folder
    assert ctx.missing("run") is None and ctx.missing("preference_model") is None


def test_a_preference_model_folder_given_on_the_command_line_is_used(
    echo_run: Path, echo_eval: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from caikit_core.eval_context import run_artifacts
    from caikit_core.store import RunStore

    assert cli.main(["run", str(echo_run), "-q"]) == 0
    pm = tmp_path / "pm"
    shutil.copytree(run_artifacts(RunStore(echo_run.parent / "out"))["preference_model"], pm)
    fresh = echo_run.with_name("fresh.toml")
    fresh.write_text(echo_run.read_text().replace('"out"', '"never-ran"'), encoding="utf-8")
    argv = ["eval", "hhh", "--config", str(fresh), "--set", "preference_model=true"]
    assert cli.main([*argv, "-q"]) == 2  # no run directory, no trained preference model
    capsys.readouterr()
    out = tmp_path / "res"
    code = cli.main([*argv, "--preference-model", str(pm), "--out", str(out), "--set", "limit=2"])
    assert code == 0, capsys.readouterr().err
    assert "preference_model/accuracy" in read_result(out / "hhh").metrics


def test_set_values_are_read_as_toml_and_dotted_keys_nest() -> None:
    from caikit_core.errors import CaikitError
    from caikit_core.eval_command import parse_set

    got = parse_set(["limit=5", "debias=true", 'data="hhh"', "name=plain", "a.b=[1, 2]"])
    assert got == {"limit": 5, "debias": True, "data": "hhh", "name": "plain", "a": {"b": [1, 2]}}
    with pytest.raises(CaikitError, match="expected KEY=VALUE"):
        parse_set(["limit"])


def test_estimates_print_with_their_interval() -> None:
    from caikit_core.evaluation import Estimate, format_estimate

    assert format_estimate(Estimate(0.5, 0.25, 0.75, 8)) == "0.5 [0.25, 0.75] (90% bootstrap, n=8)"
    assert format_estimate(Estimate.exact(3.0, 3)) == "3 (exact, n=3)"
