"""``prompts``: the red-team prompts, read from the run file's ``data.prompts``.

A source stage: its input is the prompt file's content hash, so editing the
file (or its ``format``, ``field`` or ``limit``) runs everything again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caikit_core.errors import StageError
from caikit_core.records import Prompt
from caikit_core.stages.base import Context, Stage
from caikit_core.store import file_digest


class Prompts(Stage):
    name = "prompts"
    phase = "data"
    kind = "source"
    record_type = Prompt

    def input_fingerprint(self, ctx: Context) -> str:
        from caikit_core.io.prompts import PromptFileError

        path = ctx.path(ctx.config.data.prompts)
        if not path.is_file():
            raise PromptFileError(
                f"{path}: prompt file not found (data.prompts in {ctx.run.source})"
            )
        return file_digest(path, what="the prompt file")

    def settings(self, ctx: Context) -> dict[str, Any]:
        data = ctx.config.data
        return {"format": data.format, "field": data.field, "limit": data.limit}

    def items(self, ctx: Context) -> Sequence[Prompt]:
        from caikit_core.io.prompts import read_prompts

        data = ctx.config.data
        path = ctx.path(data.prompts)
        prompts = read_prompts(path, format=data.format, field=data.field, limit=data.limit)
        if not prompts:
            raise StageError(f"{path}: no prompts to run")
        return prompts
