"""Each stage module on its own: declarations, workers built from plain arguments, items,
summaries. Every stage needs a ``test_stage_<name>_...`` test here and a row in
docs/architecture.md's stage table (the first two tests fail otherwise)."""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from caikit_core import hookimpl, plugins
from caikit_core.config import RoleRef, load_run
from caikit_core.errors import StageError
from caikit_core.io.prompts import PromptFileError, make_prompt
from caikit_core.records import (
    Comparison,
    Generation,
    PreferenceLabel,
    Sample,
    SamplingParams,
    stable_id,
)
from caikit_core.runner import Runner
from caikit_core.stages import STAGES, stage_names
from caikit_core.stages.base import Context, StageResult, WorkerSpec
from caikit_core.stages.helpfulness import HelpfulnessWorker
from caikit_core.stages.labels import LabelWorker
from caikit_core.stages.pairs import PairWorker
from caikit_core.stages.responses import RespondWorker
from caikit_core.store import RunStore
from tests.conftest import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


# --- every stage is documented and tested --------------------------------------------


def test_every_stage_has_a_docs_row() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+)` \| (?:data|SL|RL|eval) \|", text, flags=re.M)
    assert rows == list(STAGES), "docs/architecture.md's stage table must list every stage"


def test_every_stage_has_a_test() -> None:
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    missing = [s for s in STAGES if not any(t.startswith(f"test_stage_{s}_") for t in tests)]
    assert missing == [], f"stages without a test_stage_<name>_... test here: {missing}"


def test_stage_declarations_are_consistent() -> None:
    order = list(STAGES)
    for name, stage in STAGES.items():
        assert stage.name == name
        assert stage.kind in ("source", "map", "fit"), name
        assert all(order.index(i) < order.index(name) for i in stage.inputs), name
        if stage.kind == "fit":
            assert stage.record_type is None and "fit" in vars(stage), name
        else:
            assert stage.record_type is not None, name
        if stage.kind == "map":
            assert "worker" in vars(stage) and stage.join is not None, name


# --- a context over the echo run ------------------------------------------------------


@pytest.fixture
def ctx(echo_run: Path, with_echo: Path) -> Context:
    run = load_run(echo_run, plugins.get_registry())
    return Context(run, RunStore(run.output_path()), STAGES)


def _echo(ctx: Context) -> RoleRef:
    return ctx.role("generator")


def test_every_map_worker_spec_pickles_and_maps_a_batch(ctx: Context, echo_run: Path) -> None:
    """Map stages hand the executor plain data: a spec that survives pickling builds a
    worker that maps a batch, with no reference to the driver's objects."""
    (echo_run.parent / "h.txt").write_text("be helpful\n", encoding="utf-8")
    echo_run.write_text(echo_run.read_text() + '\n[sl]\nhelpfulness_prompts = "h.txt"\n')
    run = load_run(echo_run, plugins.get_registry())
    summary = Runner(run, store=ctx.store).execute()
    assert {"responses", "revisions", "helpfulness", "pairs", "labels"} <= set(
        summary.context.fingerprints
    )
    done = summary.context
    for name, cls in STAGES.items():
        if cls.kind != "map" or name not in done.fingerprints:
            continue
        stage = cls()
        spec = pickle.loads(pickle.dumps(stage.worker(done)))
        assert isinstance(spec, WorkerSpec)
        items = list(stage.items(done))[:3]
        out = spec.build()(("test", 0), items)
        assert out == done.rows(name)[: len(out)], name


# --- per stage --------------------------------------------------------------------------


def test_stage_prompts_reads_the_file_and_names_a_missing_one(ctx: Context) -> None:
    stage = STAGES["prompts"]()
    items = stage.items(ctx)
    assert [p.messages[-1].content for p in items] == PROMPTS
    assert stage.settings(ctx) == {"format": "auto", "field": "prompt", "limit": None}
    (ctx.run.base_dir / "prompts.txt").unlink()
    with pytest.raises(PromptFileError, match=r"prompts.txt: prompt file not found \(data.prompts"):
        stage.input_fingerprint(ctx)


def test_stage_responses_text_does_not_depend_on_the_batch(ctx: Context) -> None:
    prompts = [make_prompt(p) for p in PROMPTS[:4]]
    worker = RespondWorker(generator=_echo(ctx), model="m", sampling=GREEDY, seed=3)
    together = worker(prompts)
    alone = [worker([p])[0] for p in prompts]
    assert together == alone
    assert [s.id for s in together] == [stable_id("response", p.id) for p in prompts]
    assert {s.model for s in together} == {"m"}
    assert STAGES["responses"]().models(ctx) == {"policy": "echo-policy"}


def test_stage_revisions_traces_each_response_under_principles(ctx: Context) -> None:
    stage = STAGES["revisions"]()
    spec = stage.worker(ctx)
    assert spec.kwargs["constitution"] is ctx.constitution
    samples = [
        Sample(stable_id("response", p.id), p.id, p.messages, "an answer", "m")
        for p in map(make_prompt, PROMPTS[:2])
    ]
    traces = spec.build()("k", samples)
    assert [t.prompt_id for t in traces] == [s.prompt_id for s in samples]
    assert all(len(t.steps) == 2 and "AN ANSWER" in t.final_response for t in traces)
    assert stage.summary(ctx, StageResult("revisions", "ran", 2, 0.0, "fp", Path("/r"))) == [
        "SL-CAI dataset (Parquet shards): /r",
        f"  export to the HF CAI schema: caikit export {ctx.store.root} --out cai.parquet",
    ]


def test_stage_helpfulness_runs_only_when_configured_and_drops_empty_answers(
    ctx: Context, echo_run: Path
) -> None:
    assert "helpfulness" not in stage_names(ctx.config)
    echo_run.write_text(echo_run.read_text() + '\n[sl]\nhelpfulness_prompts = "h.txt"\n')
    run = load_run(echo_run, plugins.get_registry())
    assert stage_names(run.config).index("helpfulness") == stage_names(run.config).index("sft") - 1

    worker = HelpfulnessWorker(
        generator=_echo(ctx),
        model="m",
        sampling=SamplingParams(max_new_tokens=0),  # the echo generator then answers ""
        samples=2,
        seed=0,
    )
    assert worker([make_prompt("hi")]) == []
    worker.sampling = GREEDY
    traces = worker([make_prompt("hi")])
    assert [t.id for t in traces] == [
        stable_id("helpfulness", make_prompt("hi").id, k) for k in (0, 1)
    ]
    assert all(t.steps == () and t.critic == "helpfulness" for t in traces)


def test_stage_sft_trains_on_revisions_and_helpfulness(ctx: Context) -> None:
    stage = STAGES["sft"]()
    ctx.fingerprints.update({"revisions": "r" * 64})
    only = stage.input_fingerprint(ctx)
    ctx.fingerprints["helpfulness"] = "h" * 64
    assert stage.input_fingerprint(ctx) != only  # helpfulness samples are SFT input too
    result = StageResult("sft", "ran", 0, 0.0, "fp", Path("/s"), artifact=Path("/s/artifact"))
    assert stage.summary(ctx, result) == ["SL-CAI checkpoint: /s/artifact"]


class _OneSample:
    capabilities = frozenset({"seeded"})

    def generate(self, requests: Any) -> list[Generation]:
        return [Generation(r.id, ("only one",), ("eos",)) for r in requests]


class _BadLabeller:
    capabilities: frozenset[str] = frozenset()

    def __init__(self, p_a: float) -> None:
        self.p_a = p_a

    def label(self, comparisons: Any, *, seed: int) -> list[PreferenceLabel]:
        return [PreferenceLabel(f"l{c.id}", c.id, self.p_a, "bad") for c in comparisons]


class _TestPlugins:
    @hookimpl
    def register_generators(self, register: Any) -> None:
        register("one-sample", lambda config, model: _OneSample())

    @hookimpl
    def register_labellers(self, register: Any) -> None:
        register("too-sure", lambda config, generator, constitution: _BadLabeller(1.5))


@pytest.fixture
def test_plugins(with_echo: Path) -> None:
    plugins.get_plugin_manager().register(_TestPlugins(), "stage-test-plugins")


def test_stage_pairs_needs_two_samples_per_prompt(ctx: Context, test_plugins: None) -> None:
    worker = PairWorker(
        generator=RoleRef("generator", "one-sample"), model="m", sampling=GREEDY, seed=0
    )
    prompt = make_prompt("hello")
    with pytest.raises(StageError, match=f"returned 1 samples for record {prompt.id}, expected 2"):
        worker([prompt])
    assert STAGES["pairs"]().models(ctx) == {"policy": "echo-policy"}  # no SFT in this context


def test_stage_labels_rejects_probabilities_outside_the_unit_interval(
    ctx: Context, test_plugins: None
) -> None:
    worker = LabelWorker(
        plugin=RoleRef("labeller", "too-sure"),
        generator=_echo(ctx),
        model="m",
        constitution=ctx.constitution,
        seed=0,
    )
    pair = Comparison("c1", "p1", make_prompt("q").messages, "a", "b")
    with pytest.raises(
        StageError,
        match=r"labeller 'too-sure' .* returned probabilities that are not finite numbers "
        r"in \[0, 1\] for records c1 \(p_a=1.5\)",
    ):
        worker([pair])


def test_stage_preference_model_prints_its_metrics_sorted(ctx: Context) -> None:
    result = StageResult(
        "preference_model", "ran", 0, 0.0, "fp", Path("/p"), metrics={"loss": 0.69314, "acc": 1.0}
    )
    assert STAGES["preference_model"]().summary(ctx, result) == [
        "preference_model: acc 1, loss 0.6931"
    ]


def test_stage_policy_prints_per_step_reward_and_kl_from_its_history(ctx: Context) -> None:
    result = StageResult(
        "policy",
        "ran",
        0,
        0.0,
        "fp",
        Path("/p"),
        artifact=Path("/p/artifact"),
        metrics={"kl": 0.0},
        history=[{"reward": 0.5, "kl": 0.0}, {"loss": 1.0}, {"reward": 0.75, "kl": 0.125}],
    )
    assert STAGES["policy"]().summary(ctx, result) == [
        "policy: kl 0",
        "  step 0: reward 0.5, KL 0.0",
        "  step 2: reward 0.75, KL 0.125",
        "RL-CAI policy checkpoint: /p/artifact",
    ]
    assert STAGES["policy"].included(ctx.config)


def test_stage_policy_hands_the_generator_to_the_optimiser_with_rl_rollouts_generator(
    echo_run: Path, with_echo: Path
) -> None:
    """rl.rollouts = "generator": the policy stage builds the run's generator on the
    policy it starts from, passes it as ``rollouts=`` and closes it afterwards; only
    the policy stage's fingerprint changes."""
    import types

    from caikit_echo.plugin import CopyOptimiser, EchoConfig, EchoGenerator

    seen: dict[str, Any] = {}

    class RollingEcho(EchoGenerator):  # type: ignore[misc]
        capabilities = frozenset({"score", "seeded", "rollouts"})

        def __init__(self, config: Any, model: str) -> None:
            super().__init__(config, model)
            self.model_name = model

        def close(self) -> None:
            seen["closed"] = self.model_name

    class RollingCopy(CopyOptimiser):  # type: ignore[misc]
        def optimise(self, policy: str, *args: Any, rollouts: Any = None) -> Any:
            seen["policy"], seen["rollouts"] = policy, rollouts
            return super().optimise(policy, *args)

    @hookimpl
    def register_generators(register):  # type: ignore[no-untyped-def]
        register(
            "rolling",
            lambda config, *, model: RollingEcho(config, model),
            config=EchoConfig,
            capabilities={"score", "seeded", "rollouts"},
        )

    @hookimpl
    def register_policy_optimisers(register):  # type: ignore[no-untyped-def]
        register(
            "rolling-copy",
            lambda config: RollingCopy(config),
            capabilities={"sft", "ppo", "generator-rollouts"},
        )

    module = types.ModuleType("rolling")
    module.register_generators = register_generators  # type: ignore[attr-defined]
    module.register_policy_optimisers = register_policy_optimisers  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(module, "rolling", distribution="rolling", version="1")
    text = echo_run.read_text().replace('plugin = "copy"', 'plugin = "rolling-copy"')
    text = text.replace('plugin = "echo"', 'plugin = "rolling"', 1)
    echo_run.write_text(text)
    plain = Runner(load_run(echo_run, plugins.get_registry())).execute().context
    assert seen["rollouts"] is None  # the default passes no generator
    echo_run.write_text(text + '\n[rl]\nrollouts = "generator"\n')
    rolled = Runner(load_run(echo_run, plugins.get_registry())).execute().context
    assert isinstance(seen["rollouts"], RollingEcho)
    assert seen["rollouts"].model_name == seen["policy"] == seen["closed"]
    assert seen["policy"] == rolled.rl_policy()[0]
    changed = {n for n in plain.fingerprints if plain.fingerprints[n] != rolled.fingerprints[n]}
    assert changed == {"policy"}


def test_a_local_run_loads_each_generator_model_once(
    echo_run: Path, with_echo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """responses, revisions and helpfulness share one policy generator; pairs load the
    SFT checkpoint once; labels the feedback model (here the configured policy) again,
    since the cache is cleared before each fit stage to free memory for training."""
    from caikit_echo import plugin as echo

    built: list[str] = []
    original = echo.EchoGenerator.__init__

    def counting(self: Any, config: Any, model: str) -> None:
        built.append(model)
        original(self, config, model)

    monkeypatch.setattr(echo.EchoGenerator, "__init__", counting)
    (echo_run.parent / "h.txt").write_text("be helpful\nbe kind\n", encoding="utf-8")
    echo_run.write_text(echo_run.read_text() + '\n[sl]\nhelpfulness_prompts = "h.txt"\n')
    summary = Runner(load_run(echo_run, plugins.get_registry())).execute()
    assert summary.stage("helpfulness").rows == 4
    sft = str(summary.stage("sft").artifact)
    assert built == ["echo-policy", sft, "echo-policy"]


def test_a_worker_spec_builds_and_maps_in_another_process(
    ctx: Context, tmp_path: Path, echo_site: Path
) -> None:
    """What a distributed executor does: the revisions stage's spec (roles, model path,
    constitution, seed) pickled here, unpickled and built in a fresh interpreter."""
    import subprocess
    import sys

    spec = STAGES["revisions"]().worker(ctx)
    samples = [
        Sample(stable_id("response", p.id), p.id, p.messages, "an answer", "m")
        for p in map(make_prompt, PROMPTS[:2])
    ]
    here = spec.build()(("k", 0), samples)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((spec, samples)))
    code = (
        "import pickle, sys\n"
        "spec, samples = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "out = spec.build()(('k', 0), samples)\n"
        "open(sys.argv[2], 'wb').write(pickle.dumps(out))\n"
    )
    env = {"PYTHONPATH": str(echo_site), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "job.pkl"), str(tmp_path / "out.pkl")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert pickle.loads((tmp_path / "out.pkl").read_bytes()) == here


# --- eval -----------------------------------------------------------------------------

FLAKY = {"fail": True, "runs": 0}


class FlakyInstrument:
    """Fails on its first evaluation (an interrupted eval stage), then counts checkpoints."""

    requires = frozenset({"checkpoints"})

    def evaluate(self, ctx: Any) -> Any:
        from caikit_core.evaluation import Estimate, EvalResult

        FLAKY["runs"] += 1
        if FLAKY["fail"]:
            FLAKY["fail"] = False
            raise RuntimeError("interrupted on purpose")
        names = sorted(ctx.checkpoints)
        return EvalResult(
            "flaky",
            metrics={"checkpoints": Estimate.exact(float(len(names)), len(names))},
            rows=[{"name": n} for n in names],
        )


def _register_flaky() -> None:
    import types

    @hookimpl
    def register_evaluations(register: Any) -> None:
        register("flaky", lambda config: FlakyInstrument())

    module = types.ModuleType("flaky")
    module.register_evaluations = register_evaluations  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(module, "flaky")


EVAL_TABLE = """
[eval]
instruments = ["hhh", "flaky"]

[eval.hhh]
limit = 3
rounds = 50
preference_model = true
"""


def test_stage_eval_runs_last_resumes_per_instrument_and_is_found(
    echo_run: Path, with_echo: Path
) -> None:
    from caikit_core.evaluation import find_results, read_result
    from tests.shared import ensure_bundled

    ensure_bundled("eval")
    _register_flaky()
    registry = plugins.get_registry()
    before = Runner(load_run(echo_run, registry)).execute()
    assert "eval" not in stage_names(load_run(echo_run, registry).config)
    echo_run.write_text(echo_run.read_text() + EVAL_TABLE, encoding="utf-8")
    run = load_run(echo_run, registry)
    assert stage_names(run.config)[-1] == "eval"
    FLAKY.update(fail=True, runs=0)
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        Runner(run).execute()
    (kept,) = (run.output_path() / "stages" / "eval").glob("*/partial/hhh/result.json")
    assert not list((run.output_path() / "stages" / "eval").glob("*/partial/flaky"))
    stamp = kept.stat().st_mtime_ns

    summary = Runner(load_run(echo_run, registry)).execute()
    for s in before.stages:  # an [eval] table changes no other stage's fingerprint
        assert summary.stage(s.name).fingerprint == s.fingerprint and s.name != "eval"
        assert summary.stage(s.name).status == "skipped"
    assert summary.stage("eval").status == "ran" and kept.stat().st_mtime_ns == stamp
    found = find_results(run.output_path())
    assert sorted(found) == ["flaky", "hhh"]
    assert found["hhh"] == summary.stage("eval").artifact / "hhh"
    hhh = read_result(found["hhh"])
    assert len(hhh.rows) == 3 and hhh.settings["limit"] == 3
    rows = hhh.rows
    assert hhh.metrics["labeller/accuracy"].value == sum(r["accuracy"] for r in rows) / 3
    assert hhh.metrics["preference_model/accuracy"].value == sum(r["pm_correct"] for r in rows) / 3
    flaky = read_result(found["flaky"])
    assert [r["name"] for r in flaky.rows] == ["base", "rl", "sl"]  # the run's checkpoints
    assert summary.stage("eval").metrics["flaky/checkpoints"] == 3.0
    manifest = json.loads((summary.stage("eval").path / "manifest.json").read_text())
    assert manifest["plugins"]["instrument:hhh"]["distribution"] == "caikit"
    assert manifest["plugins"]["instrument:flaky"]["plugin"] == "flaky"
    lines = STAGES["eval"]().summary(summary.context, summary.stage("eval"))
    assert any(line.startswith("  hhh labeller/accuracy: ") for line in lines)

    again = Runner(load_run(echo_run, registry)).execute()
    assert again.stage("eval").status == "skipped" and FLAKY["runs"] == 2
    echo_run.write_text(echo_run.read_text().replace("limit = 3", "limit = 2"), encoding="utf-8")
    changed = Runner(load_run(echo_run, registry)).execute()
    assert changed.stage("eval").status == "ran"
    assert changed.stage("eval").fingerprint != summary.stage("eval").fingerprint
    assert [s.status for s in changed.stages[:-1]] == ["skipped"] * (len(changed.stages) - 1)


def test_stage_eval_refuses_an_instrument_the_run_cannot_serve_before_any_stage_runs(
    echo_run: Path, with_echo: Path
) -> None:
    from caikit_core.errors import CaikitError
    from tests.shared import ensure_bundled

    ensure_bundled("eval")
    text = echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]')
    echo_run.write_text(text + EVAL_TABLE.replace(', "flaky"', ""), encoding="utf-8")
    run = load_run(echo_run, plugins.get_registry())
    with pytest.raises(CaikitError, match="instrument 'hhh' needs preference model"):
        Runner(run).execute()
    assert not (run.output_path() / "stages").exists()  # refused before any stage ran
