"""The ``ray`` executor: registration and settings without Ray; then, on the session's
local Ray (2 CPUs), the conformance checks, records identical to the ``local``
executor's, a killed actor, a plugin raising inside an actor, and the refusals
(ray missing, an unreachable address, more GPUs than the cluster has)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from caikit_core import hookimpl, plugins
from caikit_core.cli import main
from caikit_core.config import load_run
from caikit_core.converter import describe_error, structure
from caikit_core.errors import PluginError
from caikit_core.interfaces import WorkerFactory
from caikit_core.runner import Runner
from caikit_ray.config import RayExecutorConfig
from caikit_ray.plugin import MISSING_RAY
from caikit_ray.tests.helpers import PidReportingSpec
from tests.shared import PROMPTS, ROOT

#: the executor table the run tests use: 2 actors of half a CPU each on the 2-CPU Ray
RAY_TABLE = '\n[executor]\nplugin = "ray"\nactors = 2\nactor_cpus = 0.5\n'


def _with_output(run: Path, out: str, extra: str = "") -> Path:
    text = run.read_text().replace('output_dir = "out"', f'output_dir = "{out}"')
    path = run.parent / f"{out}.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path


def _rows(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every map and source stage's shards, row by row (pairs name the SFT folder, whose
    path differs between two output folders: left out)."""
    return {
        str(p.relative_to(root)): pq.read_table(p).to_pylist()
        for p in sorted(root.rglob("shard-*.parquet"))
        if "/pairs/" not in str(p)
    }


# --- without Ray --------------------------------------------------------------------------


def test_ray_is_a_bundled_executor_with_the_distributed_capability() -> None:
    spec = plugins.get_registry().get("executor", "ray")
    assert spec.bundled
    assert spec.config_cls is RayExecutorConfig
    assert spec.capabilities == frozenset({"distributed"})
    assert spec.preflight is not None and spec.preflight() is None  # ray is installed here


def test_check_settings_are_valid_settings_within_the_ci_machines_2_cpus() -> None:
    spec = plugins.get_registry().get("executor", "ray")
    config = structure(dict(spec.check_settings or {}), RayExecutorConfig)
    assert config == RayExecutorConfig(num_cpus=2, actors=2, actor_cpus=0.5)
    assert config.actors * config.actor_cpus <= 2


def test_importing_the_plugin_imports_no_ray() -> None:
    code = "import sys, caikit_ray.plugin\nprint('ray' in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"actors": 0}, "executor.actors: expected a positive integer, found 0"),
        ({"actor_gpus": -1.0}, "executor.actor_gpus: expected a number >= 0"),
        ({"object_store_memory": 1000}, "executor.object_store_memory: expected an integer >="),
        ({"address": " "}, "executor.address: expected a non-empty string"),
        ({"connect_timeout_s": 0}, "executor.connect_timeout_s: expected a number > 0"),
        ({"max_task_retries": -2}, "executor.max_task_retries: expected an integer >= -1"),
        ({"actor": 2}, "executor.actor"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, object], message: str) -> None:
    with pytest.raises(Exception) as info:
        structure(settings, RayExecutorConfig)
    lines = describe_error(info.value, prefix="executor")
    assert len(lines) == 1 and message in lines[0], lines


def test_without_ray_a_run_naming_it_exits_2_naming_the_extra(
    echo_run: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = importlib.util.find_spec

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name.split(".")[0] == "ray" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_ray)
    run = _with_output(echo_run, "out", RAY_TABLE)
    assert main(["run", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"executor.plugin: 'ray' cannot run here: {MISSING_RAY}" in err, err
    assert "pip install 'caikit[ray]'" in err and "Traceback" not in err
    assert not (echo_run.parent / "out").exists()  # refused before any stage


# --- on the session's Ray -----------------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_caikit_check_executor_ray_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "executor", "ray"]) == 0, capsys.readouterr()


@pytest.mark.usefixtures("ray_session")
def test_records_are_identical_to_the_local_executors(
    echo_run: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from caikit_ray.executor import RayExecutor

    monkeypatch.setattr(RayExecutor, "show_progress", lambda self: True)  # with the bars
    local = _with_output(echo_run, "out-local")
    Runner(load_run(local, plugins.get_registry())).execute()
    on_ray = _with_output(echo_run, "out-ray", RAY_TABLE)
    runner = Runner(load_run(on_ray, plugins.get_registry()))
    assert type(runner.executor).__name__ == "RayExecutor"
    runner.execute()
    want, got = _rows(echo_run.parent / "out-local"), _rows(echo_run.parent / "out-ray")
    assert len(want) == 12  # prompts, responses, revisions, labels: 3 shards each
    assert got.keys() == want.keys()
    for shard, rows in want.items():
        assert len(got[shard]) == len(rows), shard
        for i, (a, b) in enumerate(zip(rows, got[shard], strict=True)):
            assert a == b, (shard, i)
    err = capfd.readouterr().err
    assert "responses (ray)" in err and "labels (ray)" in err


def _failure(run: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["run", str(run)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.usefixtures("ray_session")
def test_a_plugin_raising_in_an_actor_fails_the_stage_as_local_does(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from caikit_core.io.prompts import make_prompt

    text = echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\nfail_on = "number 5:"')
    echo_run.write_text(text)
    local = _failure(_with_output(echo_run, "out-local"), capsys)
    on_ray = _failure(_with_output(echo_run, "out-ray", RAY_TABLE), capsys)
    # the same but for the kept shards (ray runs batches in parallel) and the run folder
    kept = re.compile(r" \(\d+ of 3 shards complete and kept; .*\)$")
    assert kept.search(on_ray) and kept.search(local)
    assert kept.sub("", on_ray) == kept.sub("", local)
    assert "stage 'responses' failed on records [" in on_ray
    assert make_prompt(PROMPTS[5]).id in on_ray and "ValueError: echo cannot answer" in on_ray
    assert "generator 'echo' (plugin 'echo' from distribution 'caikit-echo' 0.0.1) raised" in on_ray


@pytest.mark.usefixtures("ray_session")
def test_on_error_skip_on_ray_skips_what_local_skips(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    text = echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\nfail_on = "number 5:"')
    text += '\n[stages.responses]\non_error = "skip"\n\n[stages.pairs]\non_error = "skip"\n'
    echo_run.write_text(text)
    skipped = {}
    for name, table in (("out-local", ""), ("out-ray", RAY_TABLE)):
        assert main(["run", str(_with_output(echo_run, name, table))]) == 0
        files = sorted((echo_run.parent / name / "stages").glob("*/*/skipped.parquet"))
        skipped[name] = [pq.read_table(f).to_pylist() for f in files]
    capsys.readouterr()
    assert len(skipped["out-local"]) == 2 and len(skipped["out-local"][0]) == 1
    assert skipped["out-ray"] == skipped["out-local"]


@pytest.mark.usefixtures("ray_session")
def test_generator_warnings_on_ray_are_counted_as_local_counts_them(
    echo_run: Path, with_echo: Path
) -> None:
    """The echo generator warns for every answer it cuts; on 2 actors the responses
    manifest counts the same warnings, shard by shard, as a local run's."""
    import json

    text = echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]')
    echo_run.write_text(text + "\n[sl.sampling]\nmax_new_tokens = 7\n")
    manifests = {}
    for name, table in (("out-local", ""), ("out-ray", RAY_TABLE)):
        Runner(load_run(_with_output(echo_run, name, table), plugins.get_registry())).execute()
        (folder,) = (echo_run.parent / name / "stages" / "responses").iterdir()
        data = json.loads((folder / "manifest.json").read_text())
        manifests[name] = (data["warnings"], [s["warnings"] for s in data["shards"]])
    cut = "echo: answer cut at max_new_tokens=7"
    assert manifests["out-local"] == ([[cut, 11]], [[[cut, 4]], [[cut, 4]], [[cut, 3]]])
    assert manifests["out-ray"] == manifests["out-local"]


class _KillableRayPlugin:
    """``ray-pids``: the ray executor, its actors writing their PIDs into a folder and
    taking 0.4 s per batch of the responses stage."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @hookimpl
    def register_executors(self, register: Any) -> None:
        from caikit_ray.executor import RayExecutor

        folder = self.folder

        class PidRayExecutor(RayExecutor):
            def map(
                self,
                worker: WorkerFactory,
                batches: Iterable[tuple[Hashable, list[Any]]],
                *,
                total: int,
                describe: str,
            ) -> Iterator[tuple[Hashable, list[Any]]]:
                delay = 0.4 if describe == "responses" else 0.0
                spec = PidReportingSpec(worker, str(folder / describe), delay)  # type: ignore[arg-type]
                (folder / describe).mkdir(exist_ok=True)
                return super().map(spec, batches, total=total, describe=describe)

        register("ray-pids", PidRayExecutor, config=RayExecutorConfig)


@pytest.mark.usefixtures("ray_session")
def test_an_actor_killed_mid_stage_loses_and_duplicates_no_row(
    echo_run: Path, with_echo: Path, tmp_path: Path
) -> None:
    """SIGKILL to a responses actor (by the PID it wrote) while it maps its first batch:
    Ray starts another and retries; the SL stages' rows equal a local run's."""
    echo_run.write_text(echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]'))
    local = _with_output(echo_run, "out-local")
    Runner(load_run(local, plugins.get_registry())).execute()

    pids = tmp_path / "pids"
    pids.mkdir()
    plugins.get_plugin_manager().register(_KillableRayPlugin(pids), "killable-ray")
    table = RAY_TABLE.replace('plugin = "ray"', 'plugin = "ray-pids"')
    run = _with_output(echo_run, "out-ray", table)
    killed: list[int] = []

    def kill_one_responses_actor() -> None:
        deadline = time.monotonic() + 60
        folder = pids / "responses"
        while time.monotonic() < deadline:
            found = sorted(folder.iterdir()) if folder.is_dir() else []
            if found:
                time.sleep(0.6)  # its first batch has started
                pid = int(found[0].name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_responses_actor, daemon=True)
    killer.start()
    Runner(load_run(run, plugins.get_registry())).execute()
    killer.join(5)
    assert killed, "no responses actor came up to kill"
    started = {int(p.name) for p in (pids / "responses").iterdir()}
    assert len(started) >= 3, started  # 2 actors, and one started again after the kill
    want, got = _rows(echo_run.parent / "out-local"), _rows(echo_run.parent / "out-ray")
    assert len(want) == 9  # prompts, responses, revisions: 3 shards each
    assert got == want


@pytest.mark.usefixtures("ray_session")
def test_more_gpus_per_actor_than_the_cluster_has_is_refused_before_any_stage(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _with_output(echo_run, "out", RAY_TABLE + "actor_gpus = 1\n")
    line = _failure(run, capsys)
    assert "ray executor: actor_gpus = 1, but no node of the Ray cluster has more than 0 GPUs" in (
        line
    )
    assert not (echo_run.parent / "out" / "stages").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_address_is_an_error_within_the_timeout() -> None:
    from caikit_ray.executor import RayExecutor

    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(PluginError, match=r"no Ray cluster answered at '.*' within 1 s"):
        RayExecutor(RayExecutorConfig(address=address, connect_timeout_s=1.0))
    assert time.monotonic() - started < 5


def test_caikit_run_with_an_address_no_ray_answers_at_exits_2_in_bounded_time(
    echo_run: Path, with_echo: Path
) -> None:
    """10.255.255.1 is unroutable: the connection times out, or (behind a proxy that
    accepts every connection) ray.init never finishes; either way, one error within
    the timeout, before any stage."""
    run = _with_output(
        echo_run, "out", RAY_TABLE + 'address = "10.255.255.1:6379"\nconnect_timeout_s = 3\n'
    )
    code = (
        "import sys\nfrom tests.shared import ensure_bundled\nensure_bundled('ray')\n"
        "from caikit_core.cli import main\nsys.exit(main(['run', sys.argv[1]]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(with_echo), str(ROOT), str(ROOT / "plugins")]),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, str(run)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - started < 40
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ray executor: no Ray cluster answered at '10.255.255.1:6379' within 3 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (echo_run.parent / "out" / "stages").exists()


HF_RUN = """\
output_dir = "{out}"
phases = ["sl"]
seed = 5
batch_size = 1
shard_size = 2

[models]
policy = "{model}"

[data]
prompts = "prompts.txt"

[sl]
sft = false

[sl.sampling]
max_new_tokens = 6
temperature = {temperature}

[generator]
plugin = "hf"
dtype = "float32"

[critic]
plugin = "constitutional"
revisions = 1
max_new_tokens = 6
"""


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "seeded-sampling"])
def test_a_tiny_hf_model_gives_the_same_records_on_2_actors_as_local(
    tmp_path: Path, tiny_llama: Path, temperature: float
) -> None:
    """The SL data stages (responses, revisions) on a tiny random Llama: each actor
    loads its own copy; every record equals the local executor's, field by field."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:4]) + "\n", encoding="utf-8")
    for out, extra in (("out-local", ""), ("out-ray", RAY_TABLE)):
        path = tmp_path / f"{out}.toml"
        text = HF_RUN.format(out=out, model=tiny_llama, temperature=temperature)
        path.write_text(text + extra, encoding="utf-8")
        Runner(load_run(path, plugins.get_registry())).execute()
    want, got = _rows(tmp_path / "out-local"), _rows(tmp_path / "out-ray")
    assert len(want) == 6  # prompts, responses, revisions: 2 shards each
    assert got == want


_DRIVER = """\
import sys
from pathlib import Path
from tests.shared import ensure_bundled
ensure_bundled("ray")
from caikit_core import plugins
from caikit_ray.tests.test_executor import _KillableRayPlugin
plugins.get_plugin_manager().register(_KillableRayPlugin(Path(sys.argv[1])), "killable-ray")
from caikit_core.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_killed_driver_resumes_on_the_cluster_reusing_its_shards(
    echo_run: Path, with_echo: Path, tmp_path: Path
) -> None:
    """``caikit run`` connected by ``address`` to the session's Ray is SIGKILLed once the
    first responses shard is written; ``caikit run --resume`` completes the run on the
    same cluster, keeps that shard file as it was, and every row equals a local run's."""
    import ray

    echo_run.write_text(echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]'))
    local = _with_output(echo_run, "out-local")
    Runner(load_run(local, plugins.get_registry())).execute()
    gcs = ray.get_runtime_context().gcs_address
    table = RAY_TABLE.replace('plugin = "ray"', 'plugin = "ray-pids"') + f'address = "{gcs}"\n'
    run = _with_output(echo_run, "out-ray", table)
    pids = tmp_path / "pids"
    pids.mkdir()
    path = [str(with_echo), str(ROOT), str(ROOT / "plugins")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, "-c", _DRIVER, str(pids)]
    driver = subprocess.Popen(
        [*command, "run", str(run)], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    responses = echo_run.parent / "out-ray" / "stages" / "responses"
    deadline = time.monotonic() + 90
    first: list[Path] = []
    while not first and time.monotonic() < deadline and driver.poll() is None:
        first = list(responses.glob("*/shard-00000.parquet"))
        time.sleep(0.02)
    assert first, "the driver wrote no responses shard"
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    assert driver.returncode == -signal.SIGKILL
    kept = first[0].stat().st_mtime_ns
    assert not list(responses.glob("*/shard-00002.parquet"))  # killed mid-stage

    done = subprocess.run(
        [*command, "run", "--resume", str(echo_run.parent / "out-ray")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert first[0].stat().st_mtime_ns == kept  # reused, not written again
    want, got = _rows(echo_run.parent / "out-local"), _rows(echo_run.parent / "out-ray")
    assert len(want) == 9
    assert got == want
