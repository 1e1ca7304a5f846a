"""Fixtures and helpers shared by the core's tests (tests/) and the bundled plugins'
tests (plugins/*/tests/): fixture plugin distributions installed for real, run files,
a tiny Llama. The root conftest.py registers this module as a pytest plugin, so its
fixtures reach every test directory; tests/conftest.py re-exports the helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from caikit_core import plugins

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"


def pip_install_target(project: Path, target: Path) -> Path:
    """Build and install a distribution into ``target`` with pip (no index needed)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(project),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="session")
def echo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the caikit-echo fixture distribution is pip-installed."""
    return pip_install_target(FIXTURES / "caikit-echo", tmp_path_factory.mktemp("echo-site"))


@pytest.fixture(scope="session")
def clash_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the caikit-echo-clash fixture distribution is pip-installed."""
    return pip_install_target(FIXTURES / "caikit-echo-clash", tmp_path_factory.mktemp("clash-site"))


@pytest.fixture
def with_echo(echo_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make the installed caikit-echo distribution visible to this process."""
    monkeypatch.syspath_prepend(str(echo_site))
    monkeypatch.delenv("CAIKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("CAIKIT_TRACE_PLUGINS", raising=False)
    plugins.reset()
    yield echo_site
    plugins.reset()


#: bundled plugins whose entry point an environment installed before they existed may
#: lack (``pip install -e .`` adds it; ``make test`` runs that first)
LATE_BUNDLED = {"eval": "caikit_eval.plugin", "ray": "caikit_ray.plugin"}


def ensure_bundled(name: str) -> None:
    """Register the bundled plugin ``name`` in-process, as the ``caikit`` distribution,
    when this environment's installed metadata has no entry point for it (nothing
    happens where ``pip install -e .`` has run since it was added)."""
    import importlib

    from caikit_core import __version__

    manager = plugins.get_plugin_manager()
    if name not in manager.plugin_origins():
        module = importlib.import_module(LATE_BUNDLED[name])
        manager.register(module, name, distribution="caikit", version=__version__)


@pytest.fixture
def eval_plugin() -> None:
    """The bundled ``eval`` plugin registered in this process's plugin manager."""
    ensure_bundled("eval")


@pytest.fixture(autouse=True)
def _fresh_plugin_manager() -> Iterator[None]:
    """A fresh plugin manager, and no plugin instance cached by an earlier test."""
    from caikit_core.stages.base import release_instances

    plugins.reset()
    release_instances()
    yield
    plugins.reset()
    release_instances()


def run_cli(
    *args: str,
    env_extra: dict[str, str] | None = None,
    cwd: Path | None = None,
    pythonpath: list[Path] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``caikit`` command in a subprocess."""
    env = dict(os.environ)
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    env.pop("CAIKIT_TRACE_PLUGINS", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


ECHO_RUN = """\
output_dir = "out"
phases = ["sl", "rl"]
seed = 3
batch_size = 2
shard_size = 4

[models]
policy = "echo-policy"

[data]
prompts = "prompts.txt"

[generator]
plugin = "echo"

[critic]
plugin = "shout"
revisions = 2

[labeller]
plugin = "length"

[preference_model]
plugin = "wordcount"

[policy_optimiser]
plugin = "copy"
"""

PROMPTS = [f"prompt number {i}: how would you answer question {i * 7}?" for i in range(11)]


@pytest.fixture
def echo_run(tmp_path: Path) -> Path:
    """A run file over 11 prompts using only the caikit-echo fixture plugins."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    path = tmp_path / "run.toml"
    path.write_text(ECHO_RUN, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module: tiny models train several times faster that
    way, more so on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with an in-process trained tokenizer."""
    from caikit_core.testing.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
