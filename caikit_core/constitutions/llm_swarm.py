"""The constitution of Hugging Face's CAI recipe (``huggingface/llm-swarm``,
``examples/constitutional-ai``): ``{"constitutions": [{"critic", "revision"}],
"system_chat": [[{"role", "content"}, ...], ...]}``.

Ids are ``llm-swarm-0``, ``llm-swarm-1``, ... Each ``system_chat`` entry is a
critique few-shot chat: the conversation, then critique request (user), critique
(assistant), revision request (user) and revision (assistant). The format has no
feedback principles. Writing it drops the name, all ids, feedback principles and
feedback few-shot examples, and refuses to drop content unless ``lossy=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from caikit_core.constitution import Constitution, CritiqueFewShot, CritiqueRevisionPrinciple
from caikit_core.constitutions.common import (
    entry_problems,
    read_json,
    to_json,
    unknown_key,
    write_text,
)
from caikit_core.converter import show, structure, unstructure
from caikit_core.errors import ConstitutionError
from caikit_core.records import Message

__all__ = ["losses", "read", "write"]


@attrs.frozen
class _Principle:
    critic: str
    revision: str


def read(path: Path) -> Constitution:
    """Read an llm-swarm constitution JSON file (unvalidated)."""
    data = read_json(path)
    source = str(path)
    if not isinstance(data, Mapping):
        raise ConstitutionError(source, f"expected an object at the top level, found {show(data)}")
    allowed = ("constitutions", "system_chat")
    problems = [unknown_key(str(k), allowed) for k in data if k not in allowed]
    principles: list[CritiqueRevisionPrinciple] = []
    raw_principles = data.get("constitutions")
    if not isinstance(raw_principles, list):
        problems.append(
            "constitutions: is missing"
            if "constitutions" not in data
            else f"constitutions: expected a list, found {show(raw_principles)}"
        )
        raw_principles = []
    for index, entry in enumerate(raw_principles):
        try:
            item = structure(entry, _Principle)
        except Exception as exc:
            problems.extend(entry_problems(f"constitutions[{index}]", exc))
            continue
        principles.append(
            CritiqueRevisionPrinciple(f"llm-swarm-{index}", item.critic, item.revision)
        )
    examples: list[CritiqueFewShot] = []
    chats = data.get("system_chat", [])
    if not isinstance(chats, list):
        problems.append(f"system_chat: expected a list of chats, found {show(chats)}")
        chats = []
    for index, chat in enumerate(chats):
        example = _example(f"system_chat[{index}]", chat, problems)
        if example is not None:
            examples.append(example)
    if problems:
        raise ConstitutionError(source, problems)
    return Constitution(
        name=path.stem, critique_revision=tuple(principles), critique_few_shot=tuple(examples)
    )


def _example(where: str, chat: Any, problems: list[str]) -> CritiqueFewShot | None:
    if not isinstance(chat, list):
        problems.append(f"{where}: expected a list of messages, found {show(chat)}")
        return None
    messages: list[Message] = []
    for turn, raw in enumerate(chat):
        try:
            messages.append(structure(raw, Message))
        except Exception as exc:
            problems.extend(entry_problems(f"{where}[{turn}]", exc))
    if len(messages) != len(chat):
        return None
    roles = [m.role for m in messages]
    head, tail = messages[:-4], messages[-4:]
    if (
        len(messages) < 6
        or roles[-4:] != ["user", "assistant", "user", "assistant"]
        or head[-1].role != "assistant"
    ):
        problems.append(
            f"{where}: cannot map to a critique few-shot example: expected the conversation "
            "(ending with an assistant turn), then critique request (user), critique "
            "(assistant), revision request (user) and revision (assistant); found roles "
            + (", ".join(roles) or "none")
        )
        return None
    return CritiqueFewShot(
        messages=tuple(head),
        critique_request=tail[0].content,
        critique=tail[1].content,
        revision_request=tail[2].content,
        revision=tail[3].content,
    )


def losses(constitution: Constitution) -> list[str]:
    """What the llm-swarm format cannot hold of ``constitution``, one phrase each."""
    losses = []
    if constitution.feedback:
        losses.append(f"the {len(constitution.feedback)} feedback principles")
    if constitution.feedback_few_shot:
        losses.append(f"the {len(constitution.feedback_few_shot)} feedback few-shot examples")
    return losses


def _data(constitution: Constitution) -> dict[str, Any]:
    return {
        "constitutions": [
            {"critic": p.critique, "revision": p.revision} for p in constitution.critique_revision
        ],
        "system_chat": [
            [
                *unstructure(e.messages),
                {"role": "user", "content": e.critique_request},
                {"role": "assistant", "content": e.critique},
                {"role": "user", "content": e.revision_request},
                {"role": "assistant", "content": e.revision},
            ]
            for e in constitution.critique_few_shot
        ],
    }


def write(constitution: Constitution, target: Path) -> None:
    """Write the llm-swarm JSON file ``target``."""
    write_text(target, to_json(_data(constitution)))
