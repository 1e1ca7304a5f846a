"""The plugin tutorial (docs/plugins/tutorial.md) works as written.

Convention: a fenced code block whose opening fence carries ``title="PATH"``, e.g.
```` ```python title="src/caikit_fluency/plugin.py" ````, is the complete content of
the file ``PATH`` of the tutorial's project; blocks without a title are commands,
output or snippets and are not written. The test writes the titled blocks into an
empty folder, builds the wheel and installs it into a temporary target with pip
(no index, no build isolation, as ``conftest.pip_install_target`` does for the
fixture distributions), then runs ``caikit plugins``, ``caikit check labeller
fluency`` and the project's own tests in subprocesses with that target on
``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytest.importorskip("torch")

TUTORIAL = ROOT / "docs" / "plugins" / "tutorial.md"
TITLED = re.compile(r'^```[\w-]*[ \t]+title="([^"]+)"[ \t]*\n(.*?)^```[ \t]*$', re.M | re.S)
WHEEL = "caikit_fluency-0.1.0-py3-none-any.whl"


def titled_blocks(text: str) -> dict[str, str]:
    """``path -> content`` of every titled code block (a path given twice is an error)."""
    files: dict[str, str] = {}
    for path, body in TITLED.findall(text):
        assert path not in files, f"{path} is given twice"
        files[path] = body
    return files


def console_output(text: str, command: str) -> list[str]:
    """The lines a ```console block shows after ``$ command``, up to the next ``$`` line."""
    for block in re.findall(r"^```console\n(.*?)^```", text, flags=re.M | re.S):
        lines = block.splitlines()
        if f"$ {command}" in lines:
            rest = lines[lines.index(f"$ {command}") + 1 :]
            return [
                line
                for line in rest[
                    : next((i for i, line in enumerate(rest) if line.startswith("$ ")), len(rest))
                ]
            ]
    raise AssertionError(f"no console block shows '$ {command}'")


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def tutorial() -> str:
    return TUTORIAL.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def project(tutorial: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial's project, written from its titled code blocks."""
    folder = tmp_path_factory.mktemp("caikit-fluency")
    for path, body in titled_blocks(tutorial).items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def site(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial's wheel, built with pip and installed into a temporary target."""
    dist = tmp_path_factory.mktemp("dist")
    _pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(dist),
        str(project),
    )
    wheels = sorted(p.name for p in dist.iterdir())
    assert wheels == [WHEEL]
    target = tmp_path_factory.mktemp("fluency-site")
    _pip(
        "install", "--quiet", "--no-deps", "--no-index", "--target", str(target), str(dist / WHEEL)
    )
    return target


def test_the_project_is_the_layout_shown(tutorial: str) -> None:
    files = titled_blocks(tutorial)
    assert sorted(files) == [
        "README.md",
        "pyproject.toml",
        "src/caikit_fluency/__init__.py",
        "src/caikit_fluency/plugin.py",
        "tests/test_fluency.py",
    ]
    layout = re.search(r"^```text\ncaikit-fluency/\n(.*?)^```", tutorial, flags=re.M | re.S)
    assert layout is not None
    for path in files:
        if path != "README.md":
            assert path in layout.group(1), path
    assert f"pip install dist/{WHEEL}" in tutorial


def test_caikit_lists_the_installed_plugin(site: Path) -> None:
    done = run_cli("plugins", pythonpath=[site])
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "fluency" in line]
    assert "labeller" in line and "caikit-fluency" in line


def test_caikit_check_passes_as_shown(tutorial: str, site: Path) -> None:
    done = run_cli(
        "check", "labeller", "fluency", pythonpath=[site], env_extra={"OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == console_output(tutorial, "caikit check labeller fluency")
    assert done.stdout.count("  PASSED  check_labeller_") == 6


def test_the_tutorials_own_tests_pass(project: Path, site: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # 6 checks by parametrize_with_checks, 6 by the base class, 1 config test
    assert re.search(r"^13 passed in ", done.stdout, flags=re.M), done.stdout
