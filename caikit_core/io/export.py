"""Export a run's revision traces as a dataset in Hugging Face's CAI schema.

The columns are those of ``HuggingFaceH4/cai-conversation-harmless``, the
dataset of HF's Constitutional AI recipe, so scripts written for it (and TRL's
trainers) read caikit's output unchanged:

================== ============================ ===================================
column             type                         value
================== ============================ ===================================
init_prompt        string                       the last user turn of the prompt
init_response      string                       the policy's initial response
critic_prompt      string                       the critique request (last step)
critic_response    string                       the critique (last step)
revision_prompt    string                       the revision request (last step)
revision_response  string                       the final revision
prompt             string                       the last user turn of the prompt
messages           list of ``{role, content}``  prompt turns + final revision
chosen             list of ``{role, content}``  prompt turns + final revision
rejected           list of ``{role, content}``  prompt turns + initial response
================== ============================ ===================================

HF's dataset has one critique-revision step per row. A caikit trace may have
several; the ``critic_*`` and ``revision_*`` columns come from its *last* step,
so they are one coherent step whose result is ``revision_response``, which
equals the final text of ``chosen`` and ``messages``. A trace without steps has
empty ``critic_*`` and ``revision_prompt`` columns and its response as the
revision. Traces the critic skipped (``skipped_reason`` set) are left out.

With TRL: ``SFTTrainer`` trains on the ``messages`` column
(``dataset.select_columns(["messages"])``). ``DPOTrainer`` trains on the
``chosen`` and ``rejected`` columns as an *implicit-prompt* preference dataset
(``dataset.select_columns(["chosen", "rejected"])``), extracting the shared
prompt turns itself. The string ``prompt`` column must be left out of a
``DPOTrainer`` dataset: TRL (1.16) reads a ``prompt`` column as the explicit
prompt and fails on a string prompt next to conversational ``chosen`` and
``rejected`` columns (``trl.maybe_extract_prompt`` maps such rows to TRL's
explicit form).

This module imports pyarrow and the standard library only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from caikit_core.errors import CaikitError, StoreError
from caikit_core.io import atomic_path
from caikit_core.records import Conversation, RevisionTrace, from_arrow
from caikit_core.store import RunStore

__all__ = [
    "CAI_COLUMNS",
    "CAI_SCHEMA",
    "FORMATS",
    "ExportFormat",
    "cai_row",
    "cai_rows",
    "export_run",
    "load_traces",
    "output_paths",
    "write_jsonl",
    "write_parquet",
]

log = logging.getLogger("caikit.export")

ExportFormat = Literal["parquet", "jsonl", "both"]

#: Accepted values of ``export_run(format=...)`` and ``caikit export --format``.
FORMATS: tuple[ExportFormat, ...] = ("parquet", "jsonl", "both")

#: The columns of an exported dataset, in order.
CAI_COLUMNS = (
    "init_prompt",
    "init_response",
    "critic_prompt",
    "critic_response",
    "revision_prompt",
    "revision_response",
    "prompt",
    "messages",
    "chosen",
    "rejected",
)

_MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
_CONVERSATION_COLUMNS = frozenset({"messages", "chosen", "rejected"})

#: The Arrow schema of an exported Parquet file.
CAI_SCHEMA = pa.schema(
    [
        pa.field(name, pa.list_(_MESSAGE) if name in _CONVERSATION_COLUMNS else pa.string())
        for name in CAI_COLUMNS
    ]
)

_SUFFIXES = {"parquet": ".parquet", "jsonl": ".jsonl"}


# --- rows --------------------------------------------------------------------------------


def _turns(messages: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _user_text(messages: Conversation) -> str:
    """The content of the last user turn ("" when there is none)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""


def cai_row(trace: RevisionTrace) -> dict[str, Any]:
    """One trace as a row of the CAI schema (see the module docstring)."""
    user = _user_text(trace.messages)
    last = max(trace.steps, key=lambda s: s.index) if trace.steps else None
    final = {"role": "assistant", "content": trace.final_response}
    initial = {"role": "assistant", "content": trace.initial_response}
    return {
        "init_prompt": user,
        "init_response": trace.initial_response,
        "critic_prompt": last.critique_prompt if last else "",
        "critic_response": last.critique if last else "",
        "revision_prompt": last.revision_prompt if last else "",
        "revision_response": trace.final_response,
        "prompt": user,
        "messages": [*_turns(trace.messages), dict(final)],
        "chosen": [*_turns(trace.messages), dict(final)],
        "rejected": [*_turns(trace.messages), initial],
    }


def cai_rows(traces: Sequence[RevisionTrace]) -> list[dict[str, Any]]:
    """Rows of the CAI schema, one per trace the critic did not skip, in order."""
    return [cai_row(t) for t in traces if t.skipped_reason is None]


# --- reading a run -----------------------------------------------------------------------


def load_traces(run_dir: Path, *, stage: str = "revisions") -> list[RevisionTrace]:
    """The revision traces of a run's complete ``stage``, in shard order.

    :raises StoreError: ``run_dir`` is not a run, has no such stage, the stage is
        incomplete or holds other records, or a shard is missing or unreadable.
    """
    store = RunStore(Path(run_dir))
    info = store.read_run()
    stages = info.get("stages")
    if not isinstance(stages, dict) or not isinstance(stages.get(stage), str):
        known = ", ".join(sorted(stages)) if isinstance(stages, dict) and stages else "none"
        raise StoreError(
            f"{store.root}: the run has no '{stage}' stage (stages run so far: {known}); "
            f"run the SL phase first"
        )
    fp: str = stages[stage]
    folder = store.stage_dir(stage, fp)
    manifest = store.read_manifest(stage, fp)
    if manifest is None:
        raise StoreError(f"{store.root}: stage '{stage}' has no manifest in {folder}")
    if manifest.record_type != RevisionTrace.__name__:
        raise StoreError(
            f"{store.root}: stage '{stage}' holds {manifest.record_type or 'no'} records, "
            "not revision traces"
        )
    present = store.complete_shards(manifest)
    if not manifest.complete or len(present) != len(manifest.shards):
        total = manifest.total_shards if manifest.total_shards is not None else "?"
        raise StoreError(
            f"{store.root}: stage '{stage}' is incomplete ({len(present)} of {total} shards); "
            f"finish it with `caikit run --resume {store.root}`"
        )
    traces: list[RevisionTrace] = []
    for path in store.shard_paths(stage, fp):
        traces.extend(from_arrow(store.read_shard(stage, fp, path.name), RevisionTrace))
    return traces


# --- writing -----------------------------------------------------------------------------


def output_paths(out: Path, format: ExportFormat) -> list[Path]:
    """The files ``export_run`` writes for ``out`` and ``format``.

    ``out`` names the file: ``cai.parquet`` writes ``cai.parquet``; ``cai`` writes
    ``cai.parquet`` (and ``cai.jsonl`` with ``"both"``). With ``"both"`` a
    ``.parquet`` or ``.jsonl`` suffix on ``out`` is replaced by each format's.
    When ``out`` is an existing folder the files are ``revisions.parquet`` and
    ``revisions.jsonl`` in it.

    :raises CaikitError: an unknown format, or a suffix that names the other format.
    """
    if format not in FORMATS:
        raise CaikitError(f"unknown export format {format!r} (expected one of {FORMATS})")
    out = Path(out)
    kinds = ["parquet", "jsonl"] if format == "both" else [format]
    if out.is_dir():
        base = out / "revisions"
    elif out.suffix in _SUFFIXES.values():
        if format != "both" and out.suffix != _SUFFIXES[format]:
            raise CaikitError(
                f"{out}: the suffix '{out.suffix}' does not match the format '{format}'"
            )
        base = out.with_suffix("")
    else:
        base = out
    return [base.with_name(base.name + _SUFFIXES[kind]) for kind in kinds]


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write rows of the CAI schema to a Parquet file atomically (temp file, rename)."""
    table = pa.Table.from_pylist(list(rows), schema=CAI_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write rows as JSON lines (UTF-8, one object per line) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in CAI_COLUMNS}, ensure_ascii=False))
            fh.write("\n")
    return path


def export_run(
    run_dir: Path,
    out: Path,
    *,
    format: ExportFormat = "parquet",
    stage: str = "revisions",
) -> list[Path]:
    """Export a run's revision traces in the CAI schema; returns the files written.

    :param run_dir: the run directory (the one holding ``run.json``).
    :param out: the output file (see :func:`output_paths`).
    :param format: ``"parquet"``, ``"jsonl"`` or ``"both"``.
    :param stage: the stage holding the traces.
    :raises CaikitError: the run has no complete ``stage``, or a bad ``out``/``format``.
    """
    paths = output_paths(out, format)
    try:
        traces = load_traces(run_dir, stage=stage)
    except OSError as exc:  # a shard or folder removed or unreadable under the run
        raise StoreError(f"{run_dir}: cannot read stage '{stage}': {exc}") from exc
    rows = cai_rows(traces)
    if not rows:
        log.warning(
            "export: every one of the %d traces was skipped; writing empty files", len(traces)
        )
    for path in paths:
        try:
            if path.suffix == ".parquet":
                write_parquet(rows, path)
            else:
                write_jsonl(rows, path)
        except OSError as exc:
            reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
            raise CaikitError(f"--out {path}: cannot write the export: {reason or exc}") from exc
        log.info(
            "export: wrote %d rows to %s (%d skipped traces left out)",
            len(rows),
            path,
            len(traces) - len(rows),
        )
    return paths
