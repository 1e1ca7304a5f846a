"""Prompt files: JSONL, Parquet, text and hh-rlhf transcripts (the real test split)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from caikit_core.io.prompts import PromptFileError, make_prompt, read_prompts
from caikit_core.io.transcripts import first_human_turn
from tests.conftest import SHARED_DATA

HH = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts.jsonl"


def test_hh_rlhf_first_human_turns() -> None:
    prompts = read_prompts(HH)  # format detected from the first row
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    assert prompts[0].messages[0].content == first_human_turn(first["chosen"])
    assert prompts[0].messages[0].role == "user"
    assert "\n\nAssistant:" not in prompts[0].messages[0].content
    assert all(p.messages[0].content for p in prompts)
    # 2,312 transcripts; red-team prompts repeat across pairs, so fewer distinct ones
    assert 1000 < len(prompts) < 2312
    assert len({p.id for p in prompts}) == len(prompts)
    assert prompts[0].source == "test.jsonl.gz:1"
    assert len(read_prompts(HH, limit=16)) == 16


def test_project_prompt_set() -> None:
    prompts = read_prompts(EXAMPLES)
    assert len(prompts) == 24
    assert prompts[0].messages[0].content.startswith("How can I get onto my neighbour's wifi")


def test_jsonl_text_and_parquet_agree(tmp_path: Path) -> None:
    texts = ["first prompt", "second prompt", "  ", "first prompt", "third ✓"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": t}) for t in texts) + "\n")
    (tmp_path / "p.txt").write_text("# comment\n" + "\n".join(texts) + "\n")
    pq.write_table(pa.table({"prompt": texts}), tmp_path / "p.parquet")
    expected = [make_prompt(t).id for t in ("first prompt", "second prompt", "third ✓")]
    for name in ("p.jsonl", "p.txt", "p.parquet"):
        assert [p.id for p in read_prompts(tmp_path / name)] == expected, name


def test_messages_column_and_custom_field(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]},
        {"question": "ignored"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    prompts = read_prompts(path)
    assert [m.role for m in prompts[0].messages] == ["system", "user"]
    path.write_text(json.dumps({"question": "what?"}) + "\n")
    assert read_prompts(path, field="question")[0].messages[0].content == "what?"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl:2: invalid JSON"),
        ("num.jsonl", '{"prompt": 3}\n', "num.jsonl:1: 'prompt' must be a string"),
        ("none.jsonl", '{"text": "x"}\n', "none.jsonl:1: no 'prompt' or 'messages' field"),
        ("list.jsonl", "[1, 2]\n", "list.jsonl:1: expected a JSON object, found list"),
        ("p.csv", "a,b\n", "cannot tell the prompt format from the name"),
        (
            "hh.jsonl",
            '{"chosen": "\\n\\nHuman: hi", "rejected": ""}\n{"chosen": 5}\n',
            "hh.jsonl:2: expected a 'chosen' transcript",
        ),
    ],
)
def test_bad_prompt_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompts(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="prompt file not found"):
        read_prompts(tmp_path / "nope.jsonl")
