"""Reliability guarantees (issue 13): stale results are never reused, damaged run
directories are repaired, bad input is refused cleanly. docs/reliability.md names
each guarantee and the test here that proves it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from caikit_core import hashing
from caikit_core.config import load_run
from caikit_core.plugins import get_registry
from caikit_core.runner import Runner
from caikit_core.store import model_fingerprint


def _run(path: Path) -> object:
    return Runner(load_run(path, get_registry())).execute()


def _status(summary: object) -> dict[str, str]:
    return {s.name: s.status for s in summary.stages}  # type: ignore[attr-defined]


def _weights(folder: Path, seed: int) -> None:
    """A model folder: weights of fixed shapes drawn from ``seed``, a config, a tokenizer."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((8, 4)).astype(np.float32)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")


@pytest.fixture
def hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """caikit's cache (and so its file-hash cache) in a fresh folder."""
    monkeypatch.setenv("CAIKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- 1. content fingerprints for models ------------------------------------------------


def test_new_weights_of_the_same_shapes_recompute_the_model_stages(
    echo_run: Path, with_echo: Path, hash_cache: Path
) -> None:
    model = echo_run.parent / "model"
    _weights(model, seed=0)
    echo_run.write_text(echo_run.read_text().replace('"echo-policy"', '"model"'))
    assert set(_status(_run(echo_run)).values()) == {"ran"}
    size = (model / "model.safetensors").stat().st_size

    _weights(model, seed=1)  # what retraining into the same folder does
    assert (model / "model.safetensors").stat().st_size == size
    status = _status(_run(echo_run))
    assert status["prompts"] == "skipped"
    assert status["responses"] == "ran" and status["revisions"] == "ran"
    assert status["pairs"] == "ran" and status["labels"] == "ran"


def test_a_model_folder_is_fingerprinted_by_content(tmp_path: Path, hash_cache: Path) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    first = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == first  # stable
    _weights(model, seed=1)
    assert model_fingerprint(str(model)) != first
    _weights(model, seed=0)
    assert model_fingerprint(str(model)) == first  # the same bytes, the same fingerprint


def _settle(folder: Path) -> None:
    """Date the folder's files an hour back, as files written by an earlier training run."""
    old = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (old, old))


def test_unchanged_files_are_not_hashed_again(
    tmp_path: Path, hash_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    _settle(model)
    first = model_fingerprint(str(model))
    assert (hash_cache / "hashes.json").is_file()
    hashing._memo.clear()  # a new process: only the cache file remembers
    read: list[Path] = []
    real = hashing._sha256

    def counting(path: Path) -> str:
        read.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "_sha256", counting)
    assert model_fingerprint(str(model)) == first
    assert read == []
    # rewritten in place with other bytes of the same size: hashed again
    _weights(model, seed=1)
    _settle(model)
    assert model_fingerprint(str(model)) != first
    assert [p.name for p in read] == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("bad", ["", "{", "[1, 2]", '{"entries": {"x": 1}}', "\x00\xff"])
def test_a_corrupt_hash_cache_is_ignored_and_rewritten(
    tmp_path: Path, hash_cache: Path, bad: str
) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    _settle(model)
    want = model_fingerprint(str(model))
    hashing._memo.clear()
    (hash_cache / "hashes.json").write_text(bad, encoding="latin-1")
    assert model_fingerprint(str(model)) == want
    entries = json.loads((hash_cache / "hashes.json").read_text())["entries"]
    assert len(entries) == 3


def test_a_hub_id_is_fingerprinted_by_its_cached_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_fingerprint("org/model") == {"id": "org/model"}  # not cached: by its id
    ref = tmp_path / "hub" / "models--org--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert model_fingerprint("org/model") == {"id": "org/model", "revision": "a" * 40}
    ref.write_text("b" * 40)  # a newer revision was downloaded
    assert model_fingerprint("org/model") == {"id": "org/model", "revision": "b" * 40}
