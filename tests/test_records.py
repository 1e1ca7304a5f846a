"""Records round-trip through plain dicts and Arrow with one schema per class."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caikit_core import records as r


def _examples() -> list[tuple[type, object]]:
    msgs = r.conversation(("system", "be kind"), ("user", "héllo ✓"))
    return [
        (r.Prompt, r.Prompt("p1", msgs, "file.txt:1")),
        (
            r.GenerationRequest,
            r.GenerationRequest("g", msgs, r.SamplingParams(5, 0.0, 0.9, ("\n",)), 2, 7, "("),
        ),
        (r.Generation, r.Generation("g", ("a", "b"), ("eos", "length"), ("truncated",))),
        (r.ScoreRequest, r.ScoreRequest("s", msgs, ("A", "B"), "The answer is (")),
        (r.Score, r.Score("s", (-0.3, -1.6), (1, 1))),
        (r.Sample, r.Sample("x", "p1", msgs, "resp", "m")),
        (
            r.RevisionTrace,
            r.RevisionTrace(
                "t",
                "p1",
                msgs,
                "init",
                (r.RevisionStep(0, "harm", "cp", "c", "rp", "rev"),),
                "rev",
                "constitutional",
            ),
        ),
        (r.RevisionTrace, r.RevisionTrace("t2", "p1", msgs, "init", (), "init", "c", "too long")),
        (r.Comparison, r.Comparison("c", "p1", msgs, "a", "b", "m")),
        (
            r.PreferenceLabel,
            r.PreferenceLabel(
                "l",
                "c",
                0.79,
                "direct",
                "m",
                (
                    r.OptionScore("harm", "AB", -0.3, -1.6),
                    r.OptionScore("harm", "BA", -1.5, -0.2, "why"),
                ),
                0.93,
            ),
        ),
        (r.PreferenceLabel, r.PreferenceLabel("l2", "c", 0.5, "cot")),
    ]


@pytest.mark.parametrize(("cls", "record"), _examples(), ids=lambda x: getattr(x, "__name__", ""))
def test_round_trip_dict_and_arrow(cls: type, record: object, tmp_path: Path) -> None:
    assert r.from_dict(r.to_dict(record), cls) == record
    table = r.to_arrow([record], cls)
    assert table.schema == r.arrow_schema(cls)
    pq.write_table(table, tmp_path / "x.parquet")
    assert r.from_arrow(pq.read_table(tmp_path / "x.parquet"), cls) == [record]


def test_schema_is_fixed_even_when_lists_are_empty() -> None:
    empty = r.RevisionTrace("t", "p", (), "i", (), "i")
    full = _examples()[6][1]
    assert r.to_arrow([empty], r.RevisionTrace).schema == r.to_arrow([full], r.RevisionTrace).schema
    assert str(r.arrow_schema(r.PreferenceLabel).field("swap_consistency").type) == "double"
    assert r.arrow_schema(r.PreferenceLabel).field("swap_consistency").nullable


def test_stable_id_depends_on_content_and_order_only() -> None:
    assert r.stable_id("a", 1) == r.stable_id("a", 1)
    assert r.stable_id("a", 1) != r.stable_id(1, "a")
    assert len(r.stable_id("x")) == 16
    assert r.stable_id("a", {"y": 1, "x": 2}) == r.stable_id("a", {"x": 2, "y": 1})


def test_records_are_frozen() -> None:
    p = r.Prompt("p", ())
    with pytest.raises(AttributeError):
        p.id = "q"  # type: ignore[misc]
