"""The evaluation file readers: the real files parse, and a bad line is one error
naming the file and the line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from caikit_core.errors import CaikitError
from caikit_eval.data import HH_FILE, HHH_FILE, data_file, read_hh_rlhf, read_hhh
from tests.shared import SHARED_DATA


def test_the_real_files_parse_into_pairs() -> None:
    hhh = read_hhh(SHARED_DATA / HHH_FILE)
    assert len(hhh.items) == 438 and not hhh.skipped
    first = hhh.items[0]
    assert first.id == "hhh:1" and first.messages[0].role == "user"
    assert first.preferred.startswith("If you want to track your wife")
    hh = read_hh_rlhf(SHARED_DATA / HH_FILE)
    assert len(hh.items) + len(hh.skipped) == 2312
    reasons = [why for _, why in hh.skipped]  # 2,303 pairs are usable
    assert reasons.count("the two transcripts differ before the last response") == 5
    assert reasons.count("a transcript does not end with an assistant response") == 4
    assert read_hhh(SHARED_DATA / HHH_FILE, limit=3).items[-1].line == 3


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps(
    {
        "text_correct": "\n\nHuman: hi\n\nAssistant: hello",
        "text_incorrect": "\n\nHuman: hi\n\nAssistant: go away",
    }
)


def test_a_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.jsonl", GOOD, json.dumps({"text_correct": "\n\nHuman: x"}))
    with pytest.raises(CaikitError, match=rf"^{path}:2: missing field 'text_incorrect'"):
        read_hhh(path)


def test_an_unknown_format_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.jsonl", GOOD, "", "{not json")
    with pytest.raises(CaikitError, match=rf"^{path}:3: not a JSON line"):
        read_hhh(path)
    path = _write(tmp_path / "f.jsonl", json.dumps({"chosen": "no labels", "rejected": "x"}))
    with pytest.raises(CaikitError, match=rf"^{path}:1: field 'chosen' is not a Human/Assistant"):
        read_hh_rlhf(path)
    path = _write(tmp_path / "g.jsonl", "[1, 2]")
    with pytest.raises(CaikitError, match=rf"^{path}:1: expected a JSON object, found list"):
        read_hhh(path)


def test_hhh_pairs_must_share_the_conversation_but_hh_rlhf_ones_are_skipped(
    tmp_path: Path,
) -> None:
    row = {
        "text_correct": "\n\nHuman: hi\n\nAssistant: hello",
        "text_incorrect": "\n\nHuman: bye\n\nAssistant: go away",
    }
    path = _write(tmp_path / "e.jsonl", GOOD, json.dumps(row))
    with pytest.raises(CaikitError, match=rf"^{path}:2: the two transcripts differ"):
        read_hhh(path)
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"chosen": row["text_correct"], "rejected": row["text_incorrect"]}))
        fh.write(
            "\n"
            + json.dumps({"chosen": row["text_correct"], "rejected": row["text_correct"] + "!"})
            + "\n"
        )
    pairs = read_hh_rlhf(hh)
    assert [i.line for i in pairs.items] == [2]
    assert pairs.skipped == ((1, "the two transcripts differ before the last response"),)


def test_a_missing_data_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(CaikitError, match=r"evaluation data not found .*path setting.*CAIKIT_DATA"):
        data_file(str(tmp_path / "nope.jsonl"), HHH_FILE)
