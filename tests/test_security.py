"""Security defaults (docs/reliability.md#security-defaults): the plugin allow-list is
resolved before any plugin module is imported, pickle-only model folders are refused,
trust_remote_code is logged, resume says what the recorded run file enables, and a run
writes nothing outside its run directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.shared import ROOT, pip_install_target, run_cli


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


HF_RUN = """\
output_dir = "out"
phases = ["sl"]

[sl]
sft = false

[models]
policy = "./empty-model"

[data]
prompts = "prompts.txt"

[generator]
plugin = "hf"
device = "cpu"
trust_remote_code = true
allow_pickle = true

[critic]
plugin = "shout"
"""


def test_trust_remote_code_is_logged_and_resume_shows_what_the_recorded_file_enables(
    tmp_path: Path, echo_site: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("how are you?\n")
    (tmp_path / "empty-model").mkdir()
    run_file = tmp_path / "run.toml"
    run_file.write_text(HF_RUN)
    first = run_cli("run", str(run_file), pythonpath=[ROOT, ROOT / "plugins", echo_site])
    assert first.returncode == 2  # the model folder holds no tokenizer: after the warnings
    said = " ".join(first.stderr.split())  # rich pads and wraps log lines
    assert (
        f"WARNING {run_file}: generator.trust_remote_code = true (runs Python code shipped with "
        f"the model) WARNING {run_file}: generator.allow_pickle = true (loads pickle weights, "
        "which can run code when read)" in said
    )
    assert "resuming" not in said
    out = tmp_path / "out"
    assert (out / "run.json").is_file()
    resumed = run_cli("run", "--resume", str(out), pythonpath=[ROOT, ROOT / "plugins", echo_site])
    assert resumed.returncode == 2
    said = " ".join(resumed.stderr.split())
    assert (
        f"WARNING resuming {out}: {out / 'run.json'} (recorded from {run_file}) enables: "
        "- generator.trust_remote_code = true (runs Python code shipped with the model) "
        "- generator.allow_pickle = true (loads pickle weights, which can run code when read) "
        "- critic: plugin 'echo' from distribution 'caikit-echo' 0.0.1, not bundled with caikit "
        f"- data.prompts = 'prompts.txt' reads {tmp_path / 'prompts.txt'}, outside the run "
        f"directory - models.policy = './empty-model' reads {tmp_path / 'empty-model'}, "
        "outside the run directory INFO" in said
    )


def test_a_plain_bundled_run_inside_its_folder_enables_nothing(
    tmp_path: Path, echo_site: Path
) -> None:
    from caikit_core import plugins
    from caikit_core.config import load_run
    from caikit_core.security import enabled, risky_settings

    out = tmp_path / "out"
    out.mkdir()
    (out / "prompts.txt").write_text("hi\n")
    run_file = out / "run.toml"
    text = HF_RUN.replace("trust_remote_code = true\nallow_pickle = true\n", "")
    text = text.replace('output_dir = "out"', 'output_dir = "."')
    text = text.replace("./empty-model", "org/m")
    run_file.write_text(text.replace('plugin = "shout"', 'plugin = "shout"\nrevisions = 1'))
    sys.path.insert(0, str(echo_site))
    try:
        plugins.reset()
        run = load_run(run_file, plugins.get_registry())
        assert risky_settings(run) == []
        assert enabled(run, out) == [
            "critic: plugin 'echo' from distribution 'caikit-echo' 0.0.1, not bundled with caikit"
        ]
    finally:
        sys.path.remove(str(echo_site))
        plugins.reset()


def _tree(root: Path, skip: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` but ``skip``: its sha256 and mtime."""
    import hashlib

    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_relative_to(skip)
    }


def test_paths_in_a_tampered_manifest_are_never_used_to_write_delete_or_read(
    echo_run: Path, with_echo: Path
) -> None:
    import json

    from caikit_core.cli import main
    from tests.test_plugin_faults import _rows, _stage_dir

    out = echo_run.parent / "out"
    assert main(["run", str(echo_run)]) == 0
    expected = {s: _rows(out, s) for s in ("responses", "revisions", "pairs", "labels")}
    outside = echo_run.parent / "outside"  # beside the run file, outside the run directory
    outside.mkdir()
    folder = _stage_dir(out, "responses")
    # a victim outside that equals shard 0 byte for byte (so its sha256 matches)
    (outside / "victim.parquet").write_bytes((folder / "shard-00000.parquet").read_bytes())
    (outside / "victim-dir").mkdir()
    (outside / "victim-dir" / "keep.txt").write_text("keep")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["file"] = str(outside / "victim.parquet")
    depth = len(folder.relative_to(outside.parent).parts)
    manifest["shards"][1]["file"] = "../" * depth + f"{outside.name}/victim.parquet"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    sft = _stage_dir(out, "sft")
    sft_manifest = json.loads((sft / "manifest.json").read_text())
    sft_manifest["artifact"] = str(outside / "victim-dir")
    (sft / "manifest.json").write_text(json.dumps(sft_manifest))
    around = echo_run.parent  # the run file's folder, holding the run directory
    before = _tree(around, out)
    assert main(["run", "--resume", str(out)]) == 0
    assert _tree(around, out) == before  # nothing outside the run directory changed
    assert (outside / "victim-dir" / "keep.txt").read_text() == "keep"
    repaired = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in repaired["shards"]] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert {s: _rows(out, s) for s in expected} == expected


#: the one module allowed to unpickle: the ray executor, reading the batches and results
#: it pickled itself inside one run (never a file)
PICKLE_ALLOWED = {"plugins/caikit_ray/executor.py"}


def test_sources_deserialise_nothing_unsafely() -> None:
    """Every ``torch.load`` passes ``weights_only=True``; YAML is never read with
    ``yaml.load``/``full_load``/``unsafe_load``; ``pickle.load(s)`` only where listed."""
    import ast

    found = []
    for folder in ("caikit_core", "plugins", "contrib"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if "/tests/" in rel:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = node.func.value
                name = f"{owner.id if isinstance(owner, ast.Name) else '?'}.{node.func.attr}"
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if name == "torch.load" and not safe:
                    found.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                if name in ("yaml.load", "yaml.full_load", "yaml.unsafe_load"):
                    found.append(f"{rel}:{node.lineno}: {name}")
                if name in ("pickle.load", "pickle.loads") and rel not in PICKLE_ALLOWED:
                    found.append(f"{rel}:{node.lineno}: {name}")
    assert found == []
