"""The bundled instruments on real tiny models (the ``hf`` generator, the bundled
``direct`` and ``cot`` labellers) and the real data files, a few items each; the
numbers are checked against the per-item rows they come from."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from caikit_core import cli, hookimpl, plugins
from caikit_core.config import load_run, resolve_instrument
from caikit_core.eval_context import RunEvalContext, build_instrument, run_instrument
from caikit_core.evaluation import EvalResult, read_result
from tests.shared import SHARED_DATA

pytestmark = pytest.mark.usefixtures("eval_plugin", "one_torch_thread")

HHH = SHARED_DATA / "anthropic-cai" / "evals" / "438HHHEvaluations.jsonl"
HH = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def write_run(folder: Path, model: Path | str, labeller: str = "direct", extra: str = "") -> Path:
    """An SL run file (no SFT) with the hf generator and a labeller on ``model``."""
    (folder / "prompts.txt").write_text("hello\n", encoding="utf-8")
    cot = "max_new_tokens = 4\n" if labeller == "cot" else ""
    text = f"""\
output_dir = "out"
phases = ["sl"]

[sl]
sft = false

[models]
policy = "{model}"

[data]
prompts = "prompts.txt"

[generator]
plugin = "hf"
device = "cpu"

[critic]
plugin = "constitutional"

[labeller]
plugin = "{labeller}"
{cot}
{extra}"""
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def evaluate(
    run_file: Path, name: str, settings: dict[str, Any], out: Path, **kw: Any
) -> EvalResult:
    run = load_run(run_file, plugins.get_registry())
    problems: list[str] = []
    resolved = resolve_instrument(name, settings, plugins.get_registry(), problems)
    assert resolved is not None, problems
    ctx = RunEvalContext(run, **kw)
    return run_instrument(name, build_instrument(resolved), resolved, ctx, out)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- hhh ------------------------------------------------------------------------------


def test_hhh_accuracy_is_the_share_of_both_orders_from_the_rows(
    tmp_path: Path, tiny_llama: Path
) -> None:
    run = write_run(tmp_path, tiny_llama)
    result = evaluate(run, "hhh", {"limit": 4, "rounds": 200}, tmp_path / "hhh")
    rows = result.rows
    assert [r["id"] for r in rows] == ["hhh:1", "hhh:2", "hhh:3", "hhh:4"]
    for r in rows:  # both orders asked, each credited 1 / 0.5 / 0
        assert {"p_preferred_first", "p_preferred_second"} <= set(r)
        assert r["accuracy"] == (r["credit_first"] + r["credit_second"]) / 2
        assert r["labeller"] == "direct"
        # the debiased direct labeller is order-symmetric: the same P in both orders
        assert r["p_preferred_first"] == pytest.approx(r["p_preferred_second"], abs=1e-9)
    acc = result.metrics["labeller/accuracy"]
    assert acc.value == mean([r["accuracy"] for r in rows]) and acc.n == 4
    assert acc.low <= acc.value <= acc.high and acc.method == "bootstrap"
    first = result.metrics["labeller/accuracy-preferred-first"]
    assert first.value == mean([r["credit_first"] for r in rows])
    back = read_result(tmp_path / "hhh")
    assert back.metrics == result.metrics and len(back.rows) == 4
    assert back.settings["limit"] == 4


def test_hhh_with_the_chain_of_thought_labeller(tmp_path: Path, tiny_llama: Path) -> None:
    run = write_run(tmp_path, tiny_llama, labeller="cot")
    result = evaluate(run, "hhh", {"limit": 1, "rounds": 20}, tmp_path / "hhh")
    (row,) = result.rows
    assert row["labeller"] == "cot"
    assert result.metrics["labeller/accuracy"].value == row["accuracy"]


class WordCountPM:
    """A preference model whose score is the response's word count."""

    capabilities = frozenset()

    def fit(self, labelled: Any, out: Path) -> Any:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        assert path.is_dir()

    def score(self, samples: Any) -> list[float]:
        return [float(len(s.response.split())) for s in samples]


def _register_wordcount_pm() -> None:
    @hookimpl
    def register_preference_models(register: Any) -> None:
        register("wordcount", lambda config, *, model: WordCountPM())

    module = types.ModuleType("wordcount_pm")
    module.register_preference_models = register_preference_models  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(module, "wordcount-pm")


def test_hhh_scores_the_trained_preference_model_on_the_same_items(
    tmp_path: Path, tiny_llama: Path
) -> None:
    _register_wordcount_pm()
    run = write_run(tmp_path, tiny_llama, extra='[preference_model]\nplugin = "wordcount"\n')
    pm = tmp_path / "pm"
    pm.mkdir()
    settings = {"limit": 5, "rounds": 50, "preference_model": True}
    result = evaluate(run, "hhh", settings, tmp_path / "hhh", preference_model=pm)
    lines = HHH.read_text(encoding="utf-8").splitlines()[:5]
    want = []
    for line in lines:  # by hand: the correct response has more words
        row = json.loads(line)
        good = row["text_correct"].rsplit("\n\nAssistant:", 1)[1].split()
        bad = row["text_incorrect"].rsplit("\n\nAssistant:", 1)[1].split()
        want.append(1.0 if len(good) > len(bad) else 0.0 if len(good) < len(bad) else 0.5)
    assert [r["pm_correct"] for r in result.rows] == want
    assert result.metrics["preference_model/accuracy"].value == mean(want)


# --- hh-alignment ---------------------------------------------------------------------


def test_hh_alignment_is_the_share_preferring_the_human_choice(
    tmp_path: Path, tiny_llama: Path
) -> None:
    run = write_run(tmp_path, tiny_llama)
    result = evaluate(run, "hh-alignment", {"limit": 3, "rounds": 100}, tmp_path / "hh")
    assert [r["id"] for r in result.rows] == ["hh:1", "hh:2", "hh:3"]
    by_hand = mean([(r["credit_first"] + r["credit_second"]) / 2 for r in result.rows])
    assert result.metrics["labeller/accuracy"].value == by_hand
    assert str(HH) in result.notes[0]


# --- position-bias --------------------------------------------------------------------


def test_position_bias_debiasing_makes_the_labeller_order_symmetric(
    tmp_path: Path, tiny_llama: Path
) -> None:
    run = write_run(tmp_path, tiny_llama, extra="")
    result = evaluate(run, "position-bias", {"limit": 6, "rounds": 100}, tmp_path / "pb")
    off = [r for r in result.rows if r["debias"] == "off"]
    on = [r for r in result.rows if r["debias"] == "on"]
    assert len(off) == len(on) == 6
    # the claim, checked before it is relied on: debiased P(A) in one order is
    # 1 - P(A) in the other, so the same position can never win both
    for r in on:
        assert r["p_a_first"] + r["p_a_second"] == pytest.approx(1.0, abs=1e-12)
        assert r["position"] == "" and r["same_position"] == 0.0
    assert result.metrics["same-position/debias-on"].value == 0.0
    same_off = mean([r["same_position"] for r in off])
    assert result.metrics["same-position/debias-off"].value == same_off
    for r in off:
        both_a = r["p_a_first"] > 0.5 and r["p_a_second"] > 0.5
        both_b = r["p_a_first"] < 0.5 and r["p_a_second"] < 0.5
        assert r["same_position"] == (1.0 if both_a or both_b else 0.0)
        assert r["swap_consistency"] == 1 - abs(r["p_a_first"] - (1 - r["p_a_second"]))
    # the labeller's own swap-consistency (debias on) is what the off rows measure
    for a, b in zip(off, on, strict=True):
        assert b["labeller_swap_consistency"] == pytest.approx(a["swap_consistency"], abs=1e-4)
    own = result.metrics["labeller-swap-consistency/debias-on"]
    assert own.value == pytest.approx(mean([r["swap_consistency"] for r in off]), abs=1e-4)
    assert "labeller-swap-consistency/debias-off" not in result.metrics
    table = result.tables["swap-consistency"]
    for variant in ("off", "on"):
        bins = [t for t in table if t["debias"] == variant]
        assert len(bins) == 10 and sum(t["count"] for t in bins) == 6


# --- the command line ---------------------------------------------------------------


def test_cli_eval_prints_metrics_with_intervals_and_writes_the_result(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path, tiny_llama)
    out = tmp_path / "results"
    argv = ["eval", "hh-alignment", "--config", str(run), "--out", str(out)]
    code = cli.main([*argv, "--set", "limit=2", "--set", "rounds=50", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "hh-alignment" / "result.json").is_file()
    assert (out / "hh-alignment" / "rows.parquet").is_file()
    line = next(x for x in captured.out.splitlines() if "labeller/accuracy:" in x)
    assert "[" in line and "90% bootstrap, n=2" in line


def test_cli_refuses_an_instrument_needing_a_preference_model_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path, tmp_path / "no-such-model")  # loading it would fail differently
    code = cli.main(["eval", "hhh", "--config", str(run), "--set", "preference_model=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err.startswith("error: instrument 'hhh' needs preference model")
        and "[preference_model]" in err
    )
    assert "Traceback" not in err


def test_cli_names_an_unknown_instrument_or_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path, tmp_path / "no-such-model")
    assert cli.main(["eval", "hhhh", "--config", str(run)]) == 2
    assert "unknown instrument plugin 'hhhh'; did you mean 'hhh'?" in capsys.readouterr().err
    assert cli.main(["eval", "hhh", "--config", str(run), "--set", "limt=3"]) == 2
    assert "eval.hhh.limt: unknown key; did you mean 'limit'?" in capsys.readouterr().err


def test_cli_bad_data_file_names_file_and_line_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path, tmp_path / "no-such-model")
    bad = tmp_path / "hhh.jsonl"
    first = HHH.read_text(encoding="utf-8").splitlines()[0]
    row = json.loads(first)
    del row["text_incorrect"]
    bad.write_text(first + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    code = cli.main(["eval", "hhh", "--config", str(run), "--set", f'path="{bad}"'])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {bad}:2: missing field 'text_incorrect'" in err


def test_cli_check_instrument_passes_the_bundled_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "instrument", "hh-alignment", "-q"]) == 0
    out = capsys.readouterr().out
    assert "6 passed" in out and "FAILED" not in out
