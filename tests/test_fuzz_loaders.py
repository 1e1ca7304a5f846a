"""Property-based fuzzing of the loaders a user's files reach: the run-file loader, the
constitution loader (each format) and the prompt loaders. Whatever the input, the only
exception allowed out is the documented one: a :class:`~caikit_core.errors.CaikitError`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caikit_core.config import check_inputs, load_run
from caikit_core.constitutions import load_constitution
from caikit_core.errors import CaikitError
from caikit_core.io.prompts import read_prompts
from caikit_core.plugins import Registry, get_registry

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: a valid run file of the bundled plugins, as data (mutated below)
VALID_RUN: dict[str, Any] = {
    "output_dir": "out",
    "phases": ["sl", "rl"],
    "seed": 1,
    "models": {"policy": "./model", "feedback": "./model"},
    "data": {"prompts": "prompts.txt", "format": "text"},
    "constitution": {"path": "default"},
    "sl": {"sampling": {"max_new_tokens": 16}, "sft": True},
    "rl": {"sampling": {"temperature": 1.0}},
    "generator": {"plugin": "hf", "device": "cpu"},
    "critic": {"plugin": "constitutional", "revisions": 1},
    "labeller": {"plugin": "direct"},
    "preference_model": {"plugin": "torch"},
    "policy_optimiser": {"plugin": "torch"},
    "eval": {"instruments": ["hhh"]},
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def to_toml(data: dict[str, Any]) -> str:
    """``data`` as TOML key/value lines (inline tables; ``None`` left out)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return "nan" if v != v else {float("inf"): "inf", float("-inf"): "-inf"}.get(v, repr(v))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        items = (f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items() if x is not None)
        return "{" + ", ".join(items) + "}"

    return "".join(f"{json.dumps(str(k))} = {value(v)}\n" for k, v in data.items() if v is not None)


@st.composite
def mutated_runs(draw: st.DrawFn) -> dict[str, Any]:
    """The valid run file with a few keys replaced by random values, or removed."""
    data = json.loads(json.dumps(VALID_RUN))
    for _ in range(draw(st.integers(1, 4))):
        table = data
        while True:
            keys = sorted(table)
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(table[key], dict) and draw(st.booleans()):
                table = table[key]
                continue
            if draw(st.integers(0, 3)) == 0:
                del table[key]
            else:
                table[key] = draw(values)
            break
    if draw(st.booleans()):
        data[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return data


@pytest.fixture(scope="module")
def registry() -> Registry:
    return get_registry()


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="caikit-fuzz-") as tmp:
        root = Path(tmp)
        (root / "prompts.txt").write_text("one prompt\n", encoding="utf-8")
        yield root


def load_or_caikit_error(path: Path, registry: Registry) -> None:
    try:
        run = load_run(path, registry)
        check_inputs(run)
    except CaikitError:
        pass


@FUZZ
@given(text=st.text(max_size=300), suffix=st.sampled_from([".toml", ".yaml", ".yml"]))
def test_run_file_loader_on_random_text(
    text: str, suffix: str, folder: Path, registry: Registry
) -> None:
    path = folder / f"run{suffix}"
    path.write_text(text, encoding="utf-8")
    load_or_caikit_error(path, registry)


@FUZZ
@given(data=st.dictionaries(st.text(max_size=10), values, max_size=6), as_toml=st.booleans())
def test_run_file_loader_on_random_documents(
    data: dict[str, Any], as_toml: bool, folder: Path, registry: Registry
) -> None:
    path = folder / ("run.toml" if as_toml else "run.yaml")
    path.write_text(to_toml(data) if as_toml else yaml.safe_dump(data), encoding="utf-8")
    load_or_caikit_error(path, registry)


@FUZZ
@given(data=mutated_runs(), as_toml=st.booleans())
def test_run_file_loader_on_mutated_run_files(
    data: dict[str, Any], as_toml: bool, folder: Path, registry: Registry
) -> None:
    path = folder / ("run.toml" if as_toml else "run.yaml")
    path.write_text(to_toml(data) if as_toml else yaml.safe_dump(data), encoding="utf-8")
    load_or_caikit_error(path, registry)


def test_the_valid_run_file_loads(folder: Path, registry: Registry) -> None:
    """The mutations start from a run file that loads (so they test the loader's checks)."""
    path = folder / "valid.toml"
    path.write_text(to_toml(VALID_RUN), encoding="utf-8")
    assert load_run(path, registry).config.critic is not None


# --- constitutions --------------------------------------------------------------------

CONSTITUTION_FILES = {
    "caikit TOML": ("c.toml", "caikit"),
    "caikit YAML": ("c.yaml", "auto"),
    "caikit JSON": ("c.json", "caikit"),
    "anthropic": ("CritiqueRevisionInstructions.json", "anthropic"),
    "anthropic few-shot": ("CritiqueRevisionFewShotPrompts.json", "auto"),
    "llm-swarm": ("swarm.json", "llm-swarm"),
}

entries = st.dictionaries(
    st.sampled_from(
        ["id", "critique", "revision", "text", "name", "prompt", "principle", "answer", "x"]
    ),
    values,
    max_size=5,
)
documents = (
    st.dictionaries(
        st.sampled_from(
            ["name", "critique_revision", "feedback", "critique_few_shot", "feedback_few_shot"]
        )
        | st.text(max_size=6),
        st.lists(entries, max_size=3) | values,
        max_size=4,
    )
    | st.lists(entries | values, max_size=4)
    | st.dictionaries(st.just("constitutions"), st.lists(entries, max_size=3) | values)
    | st.dictionaries(st.text(max_size=10), st.lists(st.text(max_size=20), max_size=3))
)


@FUZZ
@given(
    kind=st.sampled_from(sorted(CONSTITUTION_FILES)),
    data=documents,
    raw=st.none() | st.text(max_size=200),
)
def test_constitution_loader(kind: str, data: Any, raw: str | None, folder: Path) -> None:
    name, fmt = CONSTITUTION_FILES[kind]
    path = folder / "constitutions" / name
    path.parent.mkdir(exist_ok=True)
    if raw is not None:
        text = raw
    elif name.endswith(".toml"):
        text = to_toml(data) if isinstance(data, dict) else "x = 1\n"
    elif name.endswith(".yaml"):
        text = yaml.safe_dump(data)
    else:
        text = json.dumps(data)
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(CaikitError):
        load_constitution(path, fmt)


# --- prompt files ---------------------------------------------------------------------

PROMPT_FILES = ["p.txt", "p.txt.gz", "p.jsonl", "p.jsonl.gz", "p.parquet"]

rows = st.lists(
    st.dictionaries(
        st.sampled_from(["prompt", "messages", "chosen", "role", "content"]), values, max_size=3
    ),
    max_size=4,
)


def _prompt_bytes(name: str, data: bytes | list[dict[str, Any]]) -> bytes:
    if isinstance(data, bytes):
        return data
    if name.endswith(".parquet"):
        buffer = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(data), buffer)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            buffer = io.BytesIO()
            table = pa.table({"prompt": [json.dumps(r, default=str) for r in data]})
            pq.write_table(table, buffer)
        return buffer.getvalue()
    text = "".join(json.dumps(r) + "\n" for r in data)
    return gzip.compress(text.encode()) if name.endswith(".gz") else text.encode()


@FUZZ
@given(
    name=st.sampled_from(PROMPT_FILES),
    data=st.binary(max_size=300) | rows,
    cut=st.none() | st.integers(min_value=0, max_value=400),
    fmt=st.sampled_from(["auto", "auto", "jsonl", "text", "hh-rlhf", "parquet"]),
)
def test_prompt_loaders(
    name: str, data: bytes | list[dict[str, Any]], cut: int | None, fmt: str, folder: Path
) -> None:
    content = _prompt_bytes(name, data)
    path = folder / "prompts" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if cut is None else content[:cut])
    with contextlib.suppress(CaikitError):
        read_prompts(path, format=fmt)
