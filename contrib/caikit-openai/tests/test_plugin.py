"""The plugin's settings and its registration through the ``caikit`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from caikit_core.converter import InvalidValue, describe_error, structure

from caikit_openai.plugin import OpenAIConfig

PROJECT = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    config = OpenAIConfig()
    assert config.base_url == "http://127.0.0.1:8000/v1"
    assert config.api_key_env == "OPENAI_API_KEY"
    assert config.prefix_mode == "prefill"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_url", "ftp://host/v1", "http:// or https://"),
        ("base_url", "localhost:8000", "http:// or https://"),
        ("base_url", "http://host/v1?x=1", "query or fragment"),
        ("api_key_env", "NOT A NAME", "environment variable"),
        ("api_key_env", "1KEY", "environment variable"),
        ("timeout", 0, "number > 0"),
        ("timeout", True, "number > 0"),
        ("max_retries", -1, "integer >= 0"),
        ("retry_backoff", -0.5, "number >= 0"),
        ("concurrency", 0, "positive integer"),
        ("prefix_mode", "append", "'prefill', 'instruct'"),
    ],
)
def test_invalid_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidValue, match=message) as info:
        OpenAIConfig(**{key: value})
    assert info.value.field == key


def test_credentials_in_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidValue, match="must not contain credentials") as info:
        OpenAIConfig(base_url="https://user:sk-hunter2@api.example.com/v1")
    assert "hunter2" not in str(info.value)


def test_config_structures_strictly_from_a_table() -> None:
    config = structure(
        {"base_url": "https://api.example.com/v1", "concurrency": 8, "timeout": 30},
        OpenAIConfig,
    )
    assert config == OpenAIConfig("https://api.example.com/v1", timeout=30.0, concurrency=8)
    with pytest.raises(Exception) as info:
        structure({"api_key": "sk-x"}, OpenAIConfig)  # the key is never a setting
    assert any("api_key" in line for line in describe_error(info.value))


def test_loads_through_its_entry_point(tmp_path: Path) -> None:
    site = tmp_path / "site"
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
            str(site),
            str(PROJECT),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIKIT_")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from caikit_core.cli import main; sys.exit(main(['plugins', '--json']))",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {(r["role"], r["name"]): r for r in json.loads(result.stdout)}
    row = rows[("generator", "openai")]
    assert row["plugin"] == "openai"
    assert row["distribution"] == "caikit-openai"
    assert row["version"] == "0.1.0"
    assert row["capabilities"] == ["seeded"]
    assert row["config"] == "OpenAIConfig"
    assert (site / "caikit_openai" / "py.typed").is_file()
