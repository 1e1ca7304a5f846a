"""``caikit report``: what the page holds (numbers, tables, plots), the PNG files beside
it, the compare/evasiveness guesses and their fallbacks, and bad run directories."""

from __future__ import annotations

import base64
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from caikit_core.cli import main
from caikit_core.errors import CaikitError
from caikit_core.evaluation import Estimate, EvalResult
from caikit_core.records import PreferenceLabel, from_arrow
from caikit_core.store import RunStore
from caikit_report.page import evasiveness_bars, render, win_rates
from caikit_report.plots import HEIGHT, WIDTH
from caikit_report.plugin import build_report
from caikit_report.rundir import read_run
from tests.conftest import FIXTURES, ROOT

from .conftest import COMPARE, EVAL_FP, EVASIVENESS

IMG = re.compile(r'<img data-plot="([^"]+)" alt="[^"]*" width="(\d+)" height="(\d+)" '
                 r'src="data:image/png;base64,([A-Za-z0-9+/=]+)">')  # fmt: skip


def _images(page: str) -> dict[str, bytes]:
    found = {m[1]: base64.b64decode(m[4]) for m in IMG.finditer(page)}
    assert all((int(m[2]), int(m[3])) == (WIDTH, HEIGHT) for m in IMG.finditer(page))
    return found


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_pyproject_registers_the_plugin_like_the_other_bundled_ones() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["caikit"]["report"] == "caikit_report.plugin"
    assert "caikit_report*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert project["tool"]["setuptools"]["package-data"]["caikit_report"] == ["py.typed"]
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["report"])
    assert "caikit[report]" in extras["dev"]


def test_report_of_a_finished_run(report_run: Path, with_report_plugin: None) -> None:
    hhh = report_run.parent / "hhh-result"
    out = build_report(report_run, evals=[hhh])
    assert out == report_run / "report" / "index.html"
    page = out.read_text(encoding="utf-8")
    images = _images(page)
    assert sorted(images) == sorted(
        [
            "labels-p_a",
            "policy",
            "compare-win_rates",
            "evasiveness-refusals",
            "hhh-result-metrics",
            "hhh-result-revision-curve",
        ]
    )
    # each plot is also a PNG beside the page, the same bytes, of the stated size
    assert sorted(p.stem for p in out.parent.glob("*.png")) == sorted(images)
    for name, data in images.items():
        assert (out.parent / f"{name}.png").read_bytes() == data
        assert _png_size(data) == (WIDTH, HEIGHT)
    # self-contained: no link or source outside the page
    assert not re.search(r'(?:src|href)="(?!data:)', page)
    assert "url(" not in page and "<script" not in page and "<link" not in page

    # the labels: count and mean P(A), from the labels stage's own rows
    info = json.loads((report_run / "run.json").read_text())
    store = RunStore(report_run)
    fp = info["stages"]["labels"]
    labels = [
        x
        for path in store.shard_paths("labels", fp)
        for x in from_arrow(store.read_shard("labels", fp, path.name), PreferenceLabel)
    ]
    assert len(labels) == 11
    mean = round(sum(x.p_a for x in labels) / len(labels), 4)
    prefer_a = sum(x.p_a > 0.5 for x in labels)
    assert f"<td>11</td><td>{mean:.4g}</td><td>{prefer_a}</td>" in page
    assert "the labels carry one order only" in page  # the echo labeller asks one order

    # provenance: every stage with its fingerprint, rows, and the plugins' versions
    for stage, stage_fp in info["stages"].items():
        if stage == "eval":  # recorded by the fixture; the run file has no [eval] table
            continue
        assert f"<td>{stage}</td>" in page
        assert stage_fp in page
    assert "<td>responses</td><td>map</td><td>complete</td><td>11</td>" in page
    assert "<td>policy_optimiser</td><td>copy</td><td>caikit-echo</td><td>0.0.1</td>" in page
    assert "<td>executor</td><td>local</td><td>caikit</td>" in page

    # the policy's metrics; the PM recorded no history, so it says so instead of a plot
    assert "<th>kl</th><th>reward</th></tr><tr><td>0.2</td><td>3</td>" in page
    assert "The preference model&#x27;s plugin recorded no per-step history." in page
    assert "Not recorded by the optimiser" not in page  # all four PPO panels present

    # evaluation: the alarm at the top and with its result, metrics with intervals
    top, rest = page.split("<h2>Run</h2>")
    assert "evasiveness (evasiveness): over-refusal: rl refuses 40% of safe prompts" in top
    assert "ALARM over-refusal" in rest
    assert "<td>accuracy/direct</td><td>0.51</td><td>0.47</td><td>0.55</td><td>0.9</td>" in page
    assert "<td>harmless</td><td>0.6</td><td>58</td>" in page
    assert "a synthetic result for the report tests" in page
    # compare: the ratings best first
    ratings = page.split("Ratings (elo), best first")[1]
    assert ratings.index("<td>rl</td>") < ratings.index("<td>sl</td>") < ratings.index("<td>base")


def test_cli_prints_the_page_path_and_takes_out(
    report_run: Path,
    with_report_plugin: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(report_run), "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert len(_images(target.read_text())) == 4  # no --eval: the two eval-stage results
    assert (target.parent / "policy.png").is_file()
    assert not (report_run / "report").exists()
    hhh = report_run.parent / "hhh-result"
    assert main(["report", str(report_run), "--eval", str(hhh), "--eval", str(hhh)]) == 0
    page = (report_run / "report" / "index.html").read_text()
    assert capsys.readouterr().out.strip() == str(report_run / "report" / "index.html")
    # the same folder twice: shown twice, its plots' names kept apart
    assert page.count("<h3>hhh-result: <code>hhh</code></h3>") == 2
    assert {"hhh-result-metrics", "hhh-result-metrics-2"} <= set(_images(page))


def test_report_of_the_old_hf_run_shows_calibration_across_orders(tmp_path: Path) -> None:
    run_dir = tmp_path / "out"
    shutil.copytree(FIXTURES / "run-v0.1.0-hf" / "out", run_dir)
    view = read_run(run_dir)
    assert view.labels is not None
    assert len(view.labels.p_a) == len(view.labels.orders) == 4  # debias: both orders
    # P(A) = the mean of the two orders' P(A) (the labeller's combine_options, no clamp)
    for p, (first, second) in zip(view.labels.p_a, view.labels.orders, strict=True):
        assert p == pytest.approx((first + second) / 2, abs=1e-9)
    page, drawn = render(view)
    assert [p.name for p in drawn] == ["labels-p_a", "labels-orders"]
    assert "Calibration across orders: 4 labels were asked in both orders" in page
    assert "<h2>Policy optimisation (RL)</h2>" not in page  # the run trains no policy
    assert "No evaluation results in this run" in page


def test_empty_directory_is_one_error_line_and_writes_nothing(
    tmp_path: Path, with_report_plugin: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "not a caikit run directory: run.json is missing" in err
    assert list(tmp_path.iterdir()) == []
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_unfinished_run_names_every_missing_stage_and_writes_nothing(
    report_run: Path, with_report_plugin: None, capsys: pytest.CaptureFixture[str]
) -> None:
    info = json.loads((report_run / "run.json").read_text())
    store = RunStore(report_run)
    labels = store.read_manifest("labels", info["stages"]["labels"])
    assert labels is not None and labels.total_shards == 3
    labels.complete = False
    labels.shards = labels.shards[:1]
    store.write_manifest(labels)
    shutil.rmtree(store.artifact_dir("preference_model", info["stages"]["preference_model"]))
    shutil.rmtree(report_run / "stages" / "policy")
    assert main(["report", str(report_run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "3 of 8 stages missing or incomplete: " in err
    assert "labels (incomplete: 1 of 3 shards)" in err
    assert "preference_model (incomplete: no checkpoint)" in err
    assert "policy (absent)" in err
    assert "responses" not in err
    assert not (report_run / "report").exists()


def test_a_bad_eval_folder_is_an_error_before_anything_is_written(
    report_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(CaikitError, match="no evaluation result here"):
        build_report(report_run, evals=[tmp_path / "empty"])
    assert not (report_run / "report").exists()


def test_a_failure_while_drawing_leaves_no_file(
    report_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caikit_report import plots

    def broken(*args: object, **kwargs: object) -> plots.Plot:
        raise CaikitError("drawing failed")

    monkeypatch.setattr(plots, "series_plot", broken)
    with pytest.raises(CaikitError, match="drawing failed"):
        build_report(report_run, evals=[report_run.parent / "hhh-result"])
    assert not (report_run / "report").exists()


def test_results_are_found_under_the_eval_stage_and_run_dir_eval(report_run: Path) -> None:
    from caikit_core.evaluation import find_results as find_eval_results
    from caikit_core.evaluation import write_result

    stage = RunStore(report_run).artifact_dir("eval", EVAL_FP)
    assert find_eval_results(report_run) == {
        "compare": stage / "compare",
        "evasiveness": stage / "evasiveness",
    }
    write_result(COMPARE, report_run / "eval" / "other")  # caikit eval --run
    assert find_eval_results(report_run) == {
        "compare": stage / "compare",
        "evasiveness": stage / "evasiveness",
        "other": report_run / "eval" / "other",
    }
    assert find_eval_results(report_run / "nowhere") == {}


def test_win_rates_from_pairs_or_a_square_table_else_none() -> None:
    [(name, models, matrix)] = win_rates(COMPARE.tables)
    assert (name, models) == ("win_rates", ["base", "rl", "sl"])
    assert matrix == [[None, 0.2, 0.3], [0.8, None, 0.62], [0.7, 0.38, None]]
    square = {"m": [{"checkpoint": "a", "b": 0.7}, {"checkpoint": "b", "a": 0.3}]}
    assert win_rates(square) == [("m", ["a", "b"], [[None, 0.7], [0.3, None]])]
    assert win_rates({"elo": COMPARE.tables["elo"]}) == []
    assert win_rates({"x": [{"foo": 1}], "y": []}) == []


def test_compare_with_two_axes_gets_a_heatmap_and_ratings_each(tmp_path: Path) -> None:
    """The shape the compare instrument writes: elo/<axis> and winrate/<axis> tables."""
    from caikit_report.rundir import EvalView

    def pair(a: str, b: str, w: float) -> dict[str, object]:
        return {"model": a, "opponent": b, "wins": 3, "ties": 1, "battles": 8, "win_rate": w}

    tables: dict[str, list[dict[str, object]]] = {}
    for axis, top in (("helpful", "rl"), ("harmless", "sl")):
        low = "sl" if top == "rl" else "rl"
        tables[f"elo/{axis}"] = [
            {"model": top, "rating": 1010.0, "low": 990.0, "high": 1030.0, "wins": 5},
            {"model": low, "rating": 990.0, "low": 970.0, "high": 1010.0, "wins": 3},
        ]
        tables[f"winrate/{axis}"] = [pair(top, low, 0.6), pair(low, top, 0.4)]
    result = EvalResult("compare", {"elo/helpful/rl": Estimate(1010.0, 990, 1030, 8)}, tables)
    view = read_run(shutil.copytree(FIXTURES / "run-v0.1.0" / "out", tmp_path / "out"))
    view.evals.append(EvalView("compare", tmp_path, result))
    page, drawn = render(view)
    names = [p.name for p in drawn]
    assert names == ["labels-p_a", "compare-winrate-helpful", "compare-winrate-harmless"]
    assert page.count("best first</h4>") == 2
    harmless = page.split("Ratings (elo/harmless), best first")[1]
    assert harmless.index("<td>sl</td>") < harmless.index("<td>rl</td>")


def test_evasiveness_from_metric_names_or_a_table_else_generic() -> None:
    groups, bars = evasiveness_bars(EVASIVENESS) or ([], {})
    assert groups == ["base", "rl"]
    assert bars["rl/safe"] == EVASIVENESS.metrics["refusal_rate/safe/rl"]
    table = EvalResult(
        "evasiveness",
        tables={
            "by": [
                {"checkpoint": "sl", "split": "safe", "refusal_rate": 0.1, "n": 20},
                {"checkpoint": "sl", "split": "unsafe", "refusal_rate": 0.7, "n": 20},
            ]
        },
    )
    assert evasiveness_bars(table) == (
        ["sl"],
        {"sl/safe": Estimate(0.1, 0.1, 0.1, 20), "sl/unsafe": Estimate(0.7, 0.7, 0.7, 20)},
    )
    # the evasiveness instrument's own names; its other metrics are left to the table
    est = Estimate(0.2, 0.1, 0.3, 25, method="wilson")
    named = EvalResult(
        "evasiveness",
        metrics={
            "refusal/base/safe": est,
            "refusal/base/unsafe": est,
            "classifier/agreement": est,
            "human/refusal/full_compliance": est,
            # the classifier check's rates on XSTest's human-labelled completions: not
            # checkpoints (they were drawn as two more, "classifier" and "human")
            "classifier/refusal/safe": est,
            "human/refusal/unsafe": est,
        },
    )
    assert evasiveness_bars(named) == (["base"], {"base/safe": est, "base/unsafe": est})
    odd = EvalResult("evasiveness", metrics={"helpfulness": Estimate.exact(0.5, 3)})
    assert evasiveness_bars(odd) is None


def test_unknown_shapes_fall_back_to_the_generic_rendering(tmp_path: Path) -> None:
    view = read_run(shutil.copytree(FIXTURES / "run-v0.1.0" / "out", tmp_path / "out"))
    odd = EvalResult(
        "compare",
        metrics={"score": Estimate(0.5, 0.4, 0.6, 10)},
        tables={"mystery": [{"left": "x", "right": 2}]},
        series={"words": [{"x": "a", "value": "high"}]},
    )
    from caikit_report.rundir import EvalView

    view.evals.append(EvalView("odd", tmp_path, odd))
    page, drawn = render(view)
    assert [p.name for p in drawn] == ["labels-p_a", "odd-metrics"]  # no heatmap, a bar chart
    assert "<td>x</td><td>2</td>" in page and "<td>a</td><td>high</td>" in page
    assert "The policy optimiser recorded no per-step history." in page
