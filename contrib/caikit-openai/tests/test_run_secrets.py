"""The API key never lands in a run's files, logs, summary or error messages: a real
``caikit run`` (in-process, debug logging) of the ``openai`` generator against the
loopback server, with the key in its environment variable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from caikit_core import plugins
from caikit_core.cli import main
from caikit_core.stages.base import release_instances
from conftest import FakeOpenAI

import caikit_openai.plugin

KEY_ENV = "CAIKIT_OPENAI_TEST_KEY"
SECRET = "sk-test-run-0123456789abcdef-SECRET"

RUN = """\
output_dir = "out"
phases = ["sl"]

[sl]
sft = false

[sl.sampling]
max_new_tokens = 4

[models]
policy = "tiny"

[data]
prompts = "prompts.txt"

[generator]
plugin = "openai"
base_url = "{base_url}"
api_key_env = "{key_env}"

[critic]
plugin = "constitutional"
max_new_tokens = 4
revisions = 1
"""


@pytest.fixture
def openai_plugin() -> Iterator[None]:
    """The plugin registered in this process's plugin manager, beside the bundled ones
    (unless an earlier test's pip install made its entry point visible: then that one)."""
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if manager.pm.get_plugin("openai") is None:
        manager.register(
            caikit_openai.plugin, "openai", distribution="caikit-openai", version="test"
        )
    yield
    release_instances()
    plugins.reset()


def _run_file(tmp_path: Path, server: FakeOpenAI) -> Path:
    (tmp_path / "prompts.txt").write_text("What is the capital of France?\nhello there!\n")
    path = tmp_path / "run.toml"
    path.write_text(RUN.format(base_url=server.base_url, key_env=KEY_ENV))
    return path


def _files_holding(root: Path, secret: str) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and secret.encode() in p.read_bytes()
    )


def test_a_run_records_and_logs_no_api_key(
    tmp_path: Path,
    server: FakeOpenAI,
    openai_plugin: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.expected_key = SECRET
    run_file = _run_file(tmp_path, server)
    assert main(["run", "-v", str(run_file)]) == 0
    captured = capsys.readouterr()
    assert all(h["authorization"] == f"Bearer {SECRET}" for h, _ in server.received)
    assert (tmp_path / "out" / "run.json").is_file()
    assert any((tmp_path / "out" / "stages" / "revisions").rglob("manifest.json"))
    assert _files_holding(tmp_path, SECRET) == []
    assert SECRET not in captured.out and SECRET not in captured.err
    assert "POST http://127.0.0.1:" in captured.err  # debug logging was on


def test_a_failing_run_names_no_api_key_even_when_the_server_echoes_it(
    tmp_path: Path,
    server: FakeOpenAI,
    openai_plugin: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.failures.append((400, {"error": {"message": f"bad request from key {SECRET}"}}))
    run_file = _run_file(tmp_path, server)
    assert main(["run", "--debug", str(run_file)]) == 2
    captured = capsys.readouterr()
    assert "HTTP 400: bad request from key ***" in captured.err  # scrubbed by the plugin
    assert "Traceback" in captured.err  # --debug shows the exception chain, scrubbed too
    assert SECRET not in captured.out and SECRET not in captured.err
    assert _files_holding(tmp_path, SECRET) == []
