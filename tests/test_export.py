"""``caikit export``: revision traces in Hugging Face's CAI schema, readable by TRL as is."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from caikit_core import cli
from caikit_core.config import load_run
from caikit_core.errors import CaikitError, StoreError
from caikit_core.io.export import (
    CAI_COLUMNS,
    CAI_SCHEMA,
    cai_row,
    cai_rows,
    export_run,
    load_traces,
    output_paths,
)
from caikit_core.plugins import get_registry
from caikit_core.records import RevisionStep, RevisionTrace, conversation, to_arrow
from caikit_core.runner import Runner
from caikit_core.store import RunStore, ShardInfo, StageManifest

SKY = conversation(
    ("system", "you are a careful and friendly assistant."),
    ("user", "Please explain why the sky is blue in simple words."),
)
FRANCE = conversation(("user", "What is the capital of France?"))


def _step(index: int, revision: str) -> RevisionStep:
    return RevisionStep(
        index,
        f"harmful{index}",
        f"CritiqueRequest {index}: was the last response harmful?",
        f"Critique {index}: it was rude.",
        f"RevisionRequest {index}: rewrite it politely.",
        revision,
    )


TRACES = (
    RevisionTrace(
        "t-sky",
        "p-sky",
        SKY,
        "Figure it out yourself.",
        (_step(0, "The sky is blue, ask someone else."), _step(1, "Air scatters blue light.")),
        "Air scatters blue light.",
        "critic",
    ),
    RevisionTrace(
        "t-fr",
        "p-fr",
        FRANCE,
        "Why would I tell you?",
        (_step(0, "The capital of France is Paris."),),
        "The capital of France is Paris.",
    ),
    RevisionTrace("t-none", "p-none", FRANCE, "Paris.", (), "Paris."),
    RevisionTrace("t-skip", "p-skip", FRANCE, "", (), "", skipped_reason="prompt too long"),
)

SKY_TURNS = [
    {"role": "system", "content": "you are a careful and friendly assistant."},
    {"role": "user", "content": "Please explain why the sky is blue in simple words."},
]

#: The exported row of TRACES[0], in full.
SKY_ROW = {
    "init_prompt": "Please explain why the sky is blue in simple words.",
    "init_response": "Figure it out yourself.",
    "critic_prompt": "CritiqueRequest 1: was the last response harmful?",
    "critic_response": "Critique 1: it was rude.",
    "revision_prompt": "RevisionRequest 1: rewrite it politely.",
    "revision_response": "Air scatters blue light.",
    "prompt": "Please explain why the sky is blue in simple words.",
    "messages": [*SKY_TURNS, {"role": "assistant", "content": "Air scatters blue light."}],
    "chosen": [*SKY_TURNS, {"role": "assistant", "content": "Air scatters blue light."}],
    "rejected": [*SKY_TURNS, {"role": "assistant", "content": "Figure it out yourself."}],
}


def make_run(
    root: Path,
    traces: Sequence[RevisionTrace] = TRACES,
    *,
    shard_size: int = 2,
    complete: bool = True,
    stage: str = "revisions",
) -> Path:
    """A run directory whose ``stage`` holds ``traces``, as the pipeline writes it."""
    store = RunStore(root)
    fp = "f" * 64
    manifest = StageManifest(
        stage=stage,
        kind="map",
        fingerprint=fp,
        input_fingerprint="0" * 64,
        config_fingerprint="1" * 64,
        plugins={},
        constitution_hash=None,
        models={},
        seed=0,
        record_type="RevisionTrace",
        total_shards=-(-len(traces) // shard_size),
    )
    for index in range(0, len(traces), shard_size):
        chunk = list(traces[index : index + shard_size])
        file = store.write_shard(stage, fp, index // shard_size, to_arrow(chunk, RevisionTrace))
        manifest.shards.append(ShardInfo(index // shard_size, file, len(chunk), len(chunk), 0.1))
    manifest.complete = complete
    manifest.rows = len(traces)
    store.write_manifest(manifest)
    store.write_run({"stages": {"prompts": "e" * 64, stage: fp}})
    return root


def load(kind: str, path: Path, cache: Path) -> Any:
    import datasets

    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


# --- rows -----------------------------------------------------------------------------


def test_row_of_a_multi_step_trace() -> None:
    assert cai_row(TRACES[0]) == SKY_ROW
    assert list(cai_row(TRACES[0])) == list(CAI_COLUMNS)


def test_row_of_a_trace_without_steps() -> None:
    row = cai_row(TRACES[2])
    assert row["critic_prompt"] == row["critic_response"] == row["revision_prompt"] == ""
    assert row["revision_response"] == "Paris." == row["init_response"]
    assert row["chosen"] == row["rejected"] == row["messages"]


def test_rows_leave_out_skipped_traces_and_keep_order() -> None:
    rows = cai_rows(TRACES)
    assert [r["init_response"] for r in rows] == [t.initial_response for t in TRACES[:3]]
    for row in rows:  # the schema's invariants
        assert row["revision_response"] == row["chosen"][-1]["content"]
        assert row["messages"] == row["chosen"]
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert row["rejected"][-1] == {"role": "assistant", "content": row["init_response"]}
        assert row["prompt"] == row["init_prompt"] == row["chosen"][-2]["content"]


# --- files ----------------------------------------------------------------------------


def test_export_loads_with_datasets_exactly(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    paths = export_run(run, tmp_path / "out" / "cai", format="both")
    assert paths == [tmp_path / "out" / "cai.parquet", tmp_path / "out" / "cai.jsonl"]
    expected = cai_rows(TRACES)
    assert pq.read_schema(paths[0]).remove_metadata() == CAI_SCHEMA
    for kind, path in (("parquet", paths[0]), ("json", paths[1])):
        ds = load(kind, path, tmp_path / "hf-cache")
        assert ds.column_names == list(CAI_COLUMNS)
        assert ds.num_rows == 3
        assert ds.to_list() == expected
        assert ds[0] == SKY_ROW
    lines = paths[1].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cai.jsonl", "cai.parquet"]


def test_export_keeps_unicode(tmp_path: Path) -> None:
    text = "Grüße aus Zürich! 你好 🙂"
    trace = RevisionTrace("u", "pu", conversation(("user", text)), "no", (), text)
    run = make_run(tmp_path / "run", [trace])
    [path] = export_run(run, tmp_path / "u.jsonl", format="jsonl")
    assert text in path.read_text(encoding="utf-8")
    [parquet] = export_run(run, tmp_path / "u.parquet")
    assert pq.read_table(parquet).to_pylist()[0]["chosen"][-1]["content"] == text


def test_export_replaces_existing_files_atomically(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"stale")
    export_run(run, out)
    assert pq.read_table(out).num_rows == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_paths() -> None:
    assert output_paths(Path("a/cai"), "parquet") == [Path("a/cai.parquet")]
    assert output_paths(Path("a/cai.jsonl"), "jsonl") == [Path("a/cai.jsonl")]
    assert output_paths(Path("cai.parquet"), "both") == [Path("cai.parquet"), Path("cai.jsonl")]
    assert output_paths(Path("cai.v2"), "jsonl") == [Path("cai.v2.jsonl")]
    with pytest.raises(CaikitError, match="does not match the format 'jsonl'"):
        output_paths(Path("cai.parquet"), "jsonl")
    with pytest.raises(CaikitError, match="unknown export format"):
        output_paths(Path("cai"), "csv")  # type: ignore[arg-type]


def test_output_into_an_existing_folder(tmp_path: Path) -> None:
    assert output_paths(tmp_path, "both") == [
        tmp_path / "revisions.parquet",
        tmp_path / "revisions.jsonl",
    ]


# --- bad runs -------------------------------------------------------------------------


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a caikit run directory"):
        export_run(tmp_path, tmp_path / "out")


def test_run_without_revisions(tmp_path: Path) -> None:
    RunStore(tmp_path).write_run({"stages": {"prompts": "e" * 64}})
    with pytest.raises(StoreError, match=r"no 'revisions' stage \(stages run so far: prompts\)"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out.parquet").exists()


def test_incomplete_stage(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", complete=False)
    with pytest.raises(StoreError, match=r"'revisions' is incomplete .*caikit run --resume"):
        export_run(run, tmp_path / "out")


def test_missing_shard_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    next(run.rglob("shard-00001.parquet")).unlink()
    with pytest.raises(StoreError, match=r"incomplete \(1 of 2 shards\)"):
        load_traces(run)


def test_stage_of_other_records(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    manifest = next(run.rglob("manifest.json"))
    data = json.loads(manifest.read_text())
    data["record_type"] = "Sample"
    manifest.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="holds Sample records, not revision traces"):
        load_traces(run)


# --- command line ---------------------------------------------------------------------


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run")
    code = cli.main(["-q", "export", str(run), "--out", str(tmp_path / "cai"), "--format", "both"])
    assert code == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "cai.parquet"),
        str(tmp_path / "cai.jsonl"),
    ]
    assert pq.read_table(tmp_path / "cai.parquet").to_pylist() == cai_rows(TRACES)


def test_cli_export_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["-q", "export", str(tmp_path), "--out", str(tmp_path / "cai")])
    assert code == cli.EXIT_BAD_INPUT
    assert "not a caikit run directory" in capsys.readouterr().err


def test_cli_export_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["export", "run"])
    assert "--out" in capsys.readouterr().err


def test_export_of_a_real_run(
    echo_run: Path, with_echo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "echo,local")  # only what the run names
    summary = Runner(load_run(echo_run, get_registry())).execute()
    run_dir = echo_run.parent / "out"
    [path] = export_run(run_dir, tmp_path / "real.parquet")
    rows = pq.read_table(path).to_pylist()
    fp = summary.stage("revisions").fingerprint
    traces = [
        t
        for p in RunStore(run_dir).shard_paths("revisions", fp)
        for t in RunStore(run_dir).read_shard("revisions", fp, p.name).to_pylist()
    ]
    assert len(rows) == len(traces) == 11
    assert [r["revision_response"] for r in rows] == [t["final_response"] for t in traces]
    assert all(r["critic_prompt"] and r["revision_prompt"] for r in rows)


# --- TRL reads the export as is -------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread, even more on a busy machine."""
    torch: Any = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("trl")
    from caikit_core.testing.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture
def exported(tmp_path: Path) -> Any:
    [path] = export_run(make_run(tmp_path / "run"), tmp_path / "cai.parquet")
    return load("parquet", path, tmp_path / "hf-cache")


def _trl_args(tmp_path: Path) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": 1,
        "per_device_train_batch_size": 3,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
    }


def test_trl_sft_trains_on_the_messages_column(tiny: Path, exported: Any, tmp_path: Path) -> None:
    import transformers

    trl: Any = pytest.importorskip("trl")
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny),
        args=trl.SFTConfig(**_trl_args(tmp_path)),
        train_dataset=exported.select_columns(["messages"]),
        processing_class=transformers.AutoTokenizer.from_pretrained(tiny),
    )
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0


def test_trl_dpo_trains_on_chosen_and_rejected(tiny: Path, exported: Any, tmp_path: Path) -> None:
    import transformers

    trl: Any = pytest.importorskip("trl")
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny),
        ref_model=transformers.AutoModelForCausalLM.from_pretrained(tiny),
        args=trl.DPOConfig(**_trl_args(tmp_path)),
        train_dataset=exported.select_columns(["chosen", "rejected"]),
        processing_class=transformers.AutoTokenizer.from_pretrained(tiny),
    )
    prepared: Any = trainer.train_dataset
    first = prepared[0]  # TRL extracted the shared prompt turns itself
    assert first["prompt"] == SKY_TURNS
    assert first["chosen"] == [{"role": "assistant", "content": "Air scatters blue light."}]
    assert first["rejected"] == [{"role": "assistant", "content": "Figure it out yourself."}]
    result = trainer.train()
    assert result.global_step == 1
    assert result.training_loss == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference


def test_trl_maybe_extract_prompt_reads_full_rows(exported: Any) -> None:
    trl: Any = pytest.importorskip("trl")
    explicit = trl.maybe_extract_prompt(exported[0])
    assert explicit["prompt"] == SKY_TURNS
    assert explicit["chosen"] == [SKY_ROW["chosen"][-1]]
    assert explicit["rejected"] == [SKY_ROW["rejected"][-1]]
