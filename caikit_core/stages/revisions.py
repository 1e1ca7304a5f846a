"""``revisions``: each response critiqued and revised against sampled principles (SL-CAI).

The critic drives the run's generator on the policy model; the trace keeps each
step's principle, critique and revision.
"""

from __future__ import annotations

from typing import Any

from caikit_core.records import RevisionTrace, Sample
from caikit_core.stages.base import (
    Context,
    FeedbackWorker,
    Stage,
    StageResult,
    WorkerSpec,
    check_count,
)
from caikit_core.store import model_fingerprint


class ReviseWorker(FeedbackWorker):
    """Runs the critic over a batch of responses."""

    stage = "revisions"
    role = "critic"

    def __call__(self, batch: list[Sample]) -> list[RevisionTrace]:
        traces: list[RevisionTrace] = self.plugin.revise(batch, seed=self.seed)
        check_count(self.stage, self.plugin_role, traces, len(batch))
        return traces


class Revisions(Stage):
    name = "revisions"
    phase = "sl"
    kind = "map"
    inputs = ("responses",)
    record_type = RevisionTrace
    roles = ("generator", "critic")
    join = ("prompt_id", "prompt_id")

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {
            "shard_size": ctx.config.shard_size,
            "policy": model_fingerprint(ctx.model("policy")),
        }

    def models(self, ctx: Context) -> dict[str, str]:
        return {"policy": ctx.model("policy")}

    def worker(self, ctx: Context) -> WorkerSpec:
        return ReviseWorker.spec(ctx, ctx.model("policy"))

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        return [
            f"SL-CAI dataset (Parquet shards): {result.path}",
            f"  export to the HF CAI schema: caikit export {ctx.store.root} --out cai.parquet",
        ]

    def examples(
        self, ctx: Context, result: StageResult, count: int
    ) -> list[tuple[str, list[str]]]:
        import pyarrow.parquet as pq
        from rich.markup import escape

        from caikit_core.records import iter_from_arrow

        out: list[tuple[str, list[str]]] = []
        tables = (pq.read_table(p) for p in ctx.store.shard_paths(self.name, result.fingerprint))
        for trace in iter_from_arrow(tables, RevisionTrace):
            if len(out) >= count:
                break
            lines = [f"[bold]prompt:[/bold] {escape(trace.messages[-1].content)}"]
            lines.append(f"[bold]initial response:[/bold] {escape(trace.initial_response)}")
            for step in trace.steps:
                lines.append(f"[bold]step {step.index} ({step.principle_id})[/bold]")
                if step.critique_prompt:
                    lines.append(f"  [cyan]critique:[/cyan] {escape(step.critique)}")
                lines.append(f"  [green]revision:[/green] {escape(step.revision)}")
            if trace.skipped_reason:
                lines.append(f"[red]skipped:[/red] {escape(trace.skipped_reason)}")
            out.append((f"trace {trace.id}", lines))
        return out
