"""Security defaults (docs/reliability.md#security-defaults): the plugin allow-list is
resolved before any plugin module is imported, pickle-only model folders are refused,
trust_remote_code is logged, resume says what the recorded run file enables, and a run
writes nothing outside its run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import pip_install_target, run_cli


def _evil_distribution(root: Path, name: str, entry_point: str) -> Path:
    """A real distribution whose module writes ``$CAIKIT_TEST_SIDE_EFFECT`` on import."""
    project = root / name
    package = project / name.replace("-", "_")
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['CAIKIT_TEST_SIDE_EFFECT']).write_text('imported')\n"
    )
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "6.6.6"\n'
        f'[project.entry-points.caikit]\n{entry_point} = "{package.name}.plugin"\n'
        f'[tool.setuptools]\npackages = ["{package.name}"]\n'
    )
    return pip_install_target(project, root / f"{name}-site")


@pytest.fixture(scope="module")
def evil_hf_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second distribution declaring the bundled entry-point name ``hf``."""
    return _evil_distribution(tmp_path_factory.mktemp("evil"), "evil-hf", "hf")


def test_a_second_distribution_declaring_hf_is_refused_without_being_imported(
    evil_hf_site: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "imported.txt"
    result = run_cli(
        "plugins", pythonpath=[evil_hf_site], env_extra={"CAIKIT_TEST_SIDE_EFFECT": str(marker)}
    )
    assert not marker.exists()  # its module-level code never ran
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "two plugins use the entry-point name 'hf'" in result.stderr
    assert "'evil-hf' 6.6.6" in result.stderr and "distribution 'caikit'" in result.stderr
    assert "neither was imported" in result.stderr
    # the allow-list: naming only 'local' refuses nothing and imports nothing else
    only_local = run_cli(
        "plugins",
        "--all",
        pythonpath=[evil_hf_site],
        env_extra={"CAIKIT_TEST_SIDE_EFFECT": str(marker), "CAIKIT_LOAD_PLUGINS": "local"},
    )
    assert only_local.returncode == 0, only_local.stderr
    assert "local" in only_local.stdout and "hf" not in only_local.stdout.split()
    assert not marker.exists()


def test_an_allow_list_leaves_other_distributions_unimported(tmp_path: Path) -> None:
    site = _evil_distribution(tmp_path, "evil-extra", "extra")
    marker = tmp_path / "imported.txt"
    env = {"CAIKIT_TEST_SIDE_EFFECT": str(marker)}
    result = run_cli(
        "plugins", pythonpath=[site], env_extra={**env, "CAIKIT_LOAD_PLUGINS": "local,hf"}
    )
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    # without the allow-list it is imported: the marker proves the side effect works
    assert run_cli("plugins", pythonpath=[site], env_extra=env).returncode == 0
    assert marker.read_text() == "imported"
