"""The keyed executor contract: the kit's executor checks catch each way of breaking it,
and the runner writes the same shards whatever order (or how often) batches come back."""

from __future__ import annotations

import pickle
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from caikit_core import hookimpl, plugins
from caikit_core.config import load_run
from caikit_core.errors import ConfigError, PluginError, StageError, TrainingStopped
from caikit_core.interfaces import WorkerFactory
from caikit_core.runner import Runner
from caikit_core.stages.base import BatchFailed, WorkerSpec
from caikit_core.testing.checks import CHECKS, KitSquare
from caikit_core.testing.kit import check_plugin
from tests.test_pipeline import _snapshot

Batches = Iterable[tuple[Hashable, list[Any]]]
Out = Iterator[tuple[Hashable, list[Any]]]


class ThreadedExecutor:
    """Runs batches on a thread pool and yields them as they finish (out of order)."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        run = worker.build()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(lambda k=k, b=b: (k, run(k, b))) for k, b in batches]
            for future in reversed(futures):  # the last submitted first
                yield future.result()


class RetryingReversedExecutor:
    """Yields batches in reverse order and every batch twice (an at-least-once engine)."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        run = worker.build()
        given = list(batches)
        for key, batch in reversed(given):
            out = run(key, batch)
            yield key, out
            yield key, out


class PositionalExecutor:
    """Broken: pairs outputs with keys by position after running batches out of order."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        run = worker.build()
        given = list(batches)
        outputs = [run(k, b) for k, b in reversed(given)]
        for (key, _), out in zip(given, outputs, strict=True):
            yield key, out


class BuildPerBatchExecutor:
    """Broken: builds the worker (and so would load its models) for every batch."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        for key, batch in batches:
            yield key, worker.build()(key, batch)


class SwallowingExecutor:
    """Broken: replaces a batch's error with its own, losing the key."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        run = worker.build()
        for key, batch in batches:
            try:
                out = run(key, batch)
            except Exception as exc:
                raise RuntimeError(f"a batch failed: {exc}") from None
            yield key, out


def _failed(executor: object) -> set[str]:
    results = check_plugin("executor", executor)
    return {r.check for r in results if r.status == "failed"}


def test_good_executors_pass_every_check() -> None:
    assert _failed(ThreadedExecutor()) == set()
    assert _failed(RetryingReversedExecutor()) == set()
    names = {c.name for c in CHECKS["executor"]}
    assert "check_executor_builds_worker_once_per_process" in names


@pytest.mark.parametrize(
    ("executor", "failing"),
    [
        (PositionalExecutor(), {"check_executor_results_keyed", "check_executor_matches_local"}),
        (BuildPerBatchExecutor(), {"check_executor_builds_worker_once_per_process"}),
        (SwallowingExecutor(), {"check_executor_propagates_exceptions"}),
    ],
    ids=["positional", "build-per-batch", "swallowing"],
)
def test_each_broken_executor_fails_its_check(executor: object, failing: set[str]) -> None:
    assert _failed(executor) == failing


def test_worker_spec_pickles_and_builds_elsewhere() -> None:
    spec = WorkerSpec(KitSquare, {})
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec
    assert again.build()("k", [2, 3]) == [4, 9]


def test_batch_failed_carries_its_key_through_pickle() -> None:
    failure = BatchFailed(("shard", 3), "ValueError: bad record")
    again = pickle.loads(pickle.dumps(failure))
    assert again.key == ("shard", 3) and str(again) == "ValueError: bad record"


class _ExecutorPlugin:
    @hookimpl
    def register_executors(self, register: Any) -> None:
        register("threaded", lambda config: ThreadedExecutor())
        register("retrying", lambda config: RetryingReversedExecutor())
        register("positional", lambda config: PositionalExecutor())


def _run_with(echo_run: Path, executor: str, out: str) -> Path:
    text = echo_run.read_text().replace('output_dir = "out"', f'output_dir = "{out}"')
    echo_run.write_text(text + f'\n[executor]\nplugin = "{executor}"\n')
    manager = plugins.get_plugin_manager()
    if "test-executors" not in manager.plugin_origins():
        manager.register(_ExecutorPlugin(), "test-executors")
    Runner(load_run(echo_run, plugins.get_registry())).execute()
    return echo_run.parent / out


def _shards(root: Path) -> dict[str, str]:
    return {
        k: v
        for k, v in _snapshot(root).items()
        if k.endswith(".parquet") and "/pairs/" not in k  # pairs name the SFT folder's path
    }


@pytest.mark.parametrize("executor", ["threaded", "retrying"])
def test_out_of_order_and_repeated_batches_give_the_local_shards(
    echo_run: Path, with_echo: Path, executor: str
) -> None:
    original = echo_run.read_text()
    local = _run_with(echo_run, "local", "out-local")
    echo_run.write_text(original)
    other = _run_with(echo_run, executor, f"out-{executor}")
    assert _shards(local) == _shards(other)
    assert len(_shards(local)) == 12  # prompts, responses, revisions, labels: 3 shards each


def test_a_positional_executor_cannot_corrupt_a_run(echo_run: Path, with_echo: Path) -> None:
    """Records returned under another batch's key are caught by the runner (each
    record's ``prompt_id`` must be one of its batch's prompt ids), before any shard
    holding them is written."""
    with pytest.raises(StageError, match=r"stage 'responses': the executor returned records \["):
        _run_with(echo_run, "positional", "out-positional")
    responses = echo_run.parent / "out-positional" / "stages" / "responses"
    assert not list(responses.rglob("shard-*.parquet"))


class ChainingExecutor:
    """Wraps a batch's error in its own, with the BatchFailed as the cause (allowed)."""

    capabilities: frozenset[str] = frozenset()

    def map(self, worker: WorkerFactory, batches: Batches, *, total: int, describe: str) -> Out:
        run = worker.build()
        for key, batch in batches:
            try:
                out = run(key, batch)
            except BatchFailed as failure:
                raise RuntimeError("the engine reports a failed task") from failure
            yield key, out


class _MorePlugins:
    @hookimpl
    def register_executors(self, register: Any) -> None:
        register("chaining", lambda config: ChainingExecutor())


def test_a_chained_batch_failure_still_names_the_records(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from caikit_core.cli import main
    from caikit_core.io.prompts import make_prompt
    from tests.conftest import PROMPTS

    plugins.get_plugin_manager().register(_MorePlugins(), "more-test-plugins")
    text = echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\nfail_on = "number 5:"')
    echo_run.write_text(text + '\n[executor]\nplugin = "chaining"\n')
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert "stage 'responses' failed on records [" in err and make_prompt(PROMPTS[5]).id in err
    assert "ValueError: echo cannot answer" in err and "Traceback" not in err


def test_two_records_with_one_id_are_an_error_not_a_silent_drop(
    echo_run: Path, with_echo: Path
) -> None:
    """A batch whose records repeat an id (here: every record twice) fails the stage
    instead of losing records silently; a retried batch (a repeated key) is fine."""
    runner = Runner(load_run(echo_run, plugins.get_registry()))
    local_map = runner.executor.map

    def doubling(worker: Any, batches: Any, **kwargs: Any) -> Any:
        for key, out in local_map(worker, batches, **kwargs):
            yield key, out + out

    runner.executor.map = doubling
    with pytest.raises(
        StageError, match=r"stage 'responses': records \['[0-9a-f]+', .* more than once in shard 0"
    ):
        runner.execute()


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("run.toml", ["labeller.clamp: expected a number, found 'x'"]),
        TrainingStopped("KL 12.5 above kl_bound 10", checkpoint="/tmp/ckpt"),
        StageError("stage 'labels': labeller 'x' returned 3 results for 4 inputs"),
        PluginError("unknown labeller plugin 'y'"),
    ],
    ids=["config", "training-stopped", "stage", "plugin"],
)
def test_caikit_errors_cross_process_boundaries_intact(error: Exception) -> None:
    """A worker in another process (a Ray actor) may raise these; they must arrive with
    their message and fields, not as a constructor TypeError."""
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert vars(again) == vars(error)
