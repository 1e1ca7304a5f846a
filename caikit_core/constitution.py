"""Constitutions: critique/revision principle pairs, feedback principles and
optional few-shot examples; a content hash; seeded sampling of principles.

Loaders for the published formats live in :mod:`caikit_core.constitutions`, one
module per format.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import attrs

from caikit_core.converter import converter
from caikit_core.errors import ConstitutionError
from caikit_core.records import Conversation


@attrs.frozen
class CritiqueRevisionPrinciple:
    """A critique request and the matching revision request."""

    id: str
    critique: str
    revision: str


@attrs.frozen
class FeedbackPrinciple:
    """A comparison principle, e.g. "Which response is less harmful?"."""

    id: str
    text: str


@attrs.frozen
class CritiqueFewShot:
    """A worked critique-revise example used as a few-shot prefix."""

    messages: Conversation
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@attrs.frozen
class FeedbackFewShot:
    """A worked multiple-choice comparison; ``answer`` is "A" or "B"."""

    prompt: str
    response_a: str
    response_b: str
    principle: str
    answer: str
    rationale: str | None = None


@attrs.frozen
class Constitution:
    """A set of principles and examples; immutable, hashable by content."""

    name: str
    critique_revision: tuple[CritiqueRevisionPrinciple, ...] = ()
    feedback: tuple[FeedbackPrinciple, ...] = ()
    critique_few_shot: tuple[CritiqueFewShot, ...] = ()
    feedback_few_shot: tuple[FeedbackFewShot, ...] = ()

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the content (the name is not part of it)."""
        data = converter.unstructure(self)
        data.pop("name")
        payload = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def sample_critique_revision(self, rng: random.Random) -> CritiqueRevisionPrinciple:
        if not self.critique_revision:
            raise ValueError(f"constitution '{self.name}' has no critique/revision principles")
        return rng.choice(self.critique_revision)

    def sample_feedback(self, rng: random.Random) -> FeedbackPrinciple:
        if not self.feedback:
            raise ValueError(f"constitution '{self.name}' has no feedback principles")
        return rng.choice(self.feedback)

    def to_dict(self) -> dict[str, Any]:
        data = converter.unstructure(self)
        assert isinstance(data, dict)
        return data


def principle_rng(seed: int, *key: object) -> random.Random:
    """A random generator seeded from ``seed`` and a key (e.g. record id, step)."""
    payload = json.dumps([seed, *key], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


DEFAULT_CONSTITUTION = Path(__file__).parent / "data" / "constitution.toml"


# --- validation -----------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")
"""The roles a few-shot conversation may use."""


def _blank(value: str) -> bool:
    return not value.strip()


def _entry(section: str, index: int, entry_id: str | None = None) -> str:
    """How an entry is named in messages: ``critique_revision[3] (id 'harmful3')``."""
    return f"{section}[{index}]" + (f" (id {entry_id!r})" if entry_id else "")


def constitution_problems(
    constitution: Constitution, *, principles: bool = True, few_shot: bool = True
) -> list[str]:
    """Every problem of a constitution, one line each; empty when it is valid.

    ``principles`` / ``few_shot`` select which parts are checked.

    A valid constitution has at least one critique/revision or feedback principle;
    every principle has a non-blank id, unique within its list, and non-blank text;
    every few-shot example has non-blank text fields. A critique few-shot
    conversation uses the roles of :data:`CHAT_ROLES` and ends with the assistant
    turn that is critiqued; a feedback few-shot ``answer`` is ``"A"`` or ``"B"`` and
    its ``rationale`` is ``None`` or non-blank. A feedback few-shot ``principle`` may
    be blank: it then stands for the principle being asked about (Anthropic's
    few-shot comparisons carry none).
    """
    problems: list[str] = []
    if principles:
        problems.extend(_principle_problems(constitution))
    if few_shot:
        problems.extend(_few_shot_problems(constitution))
    return problems


def _principle_problems(constitution: Constitution) -> list[str]:
    problems: list[str] = []
    if not constitution.critique_revision and not constitution.feedback:
        problems.append("no critique/revision or feedback principles")
    sections: list[tuple[str, tuple[CritiqueRevisionPrinciple | FeedbackPrinciple, ...]]] = [
        ("critique_revision", constitution.critique_revision),
        ("feedback", constitution.feedback),
    ]
    for section, principles in sections:
        seen: dict[str, int] = {}
        for index, principle in enumerate(principles):
            where = _entry(section, index, principle.id)
            if _blank(principle.id):
                problems.append(f"{where}: 'id' is empty")
            elif principle.id in seen:
                first = _entry(section, seen[principle.id])
                problems.append(f"{where}: duplicate id (first used by {first})")
            else:
                seen[principle.id] = index
            texts = (
                (("critique", principle.critique), ("revision", principle.revision))
                if isinstance(principle, CritiqueRevisionPrinciple)
                else (("text", principle.text),)
            )
            problems.extend(f"{where}: {name!r} is empty" for name, text in texts if _blank(text))
    return problems


def _few_shot_problems(constitution: Constitution) -> list[str]:
    problems: list[str] = []
    for index, example in enumerate(constitution.critique_few_shot):
        where = _entry("critique_few_shot", index)
        for name in ("critique_request", "critique", "revision_request", "revision"):
            if _blank(getattr(example, name)):
                problems.append(f"{where}: {name!r} is empty")
        if not example.messages:
            problems.append(f"{where}: 'messages' is empty")
        for turn, message in enumerate(example.messages):
            if message.role not in CHAT_ROLES:
                allowed = ", ".join(repr(r) for r in CHAT_ROLES)
                problems.append(
                    f"{where}: 'messages[{turn}].role' must be one of {allowed}, "
                    f"found {message.role!r}"
                )
            if _blank(message.content):
                problems.append(f"{where}: 'messages[{turn}].content' is empty")
        if example.messages and example.messages[-1].role != "assistant":
            problems.append(
                f"{where}: 'messages' must end with the assistant response that is critiqued, "
                f"found a {example.messages[-1].role!r} turn"
            )
    for index, feedback_example in enumerate(constitution.feedback_few_shot):
        where = _entry("feedback_few_shot", index)
        for name in ("prompt", "response_a", "response_b"):
            if _blank(getattr(feedback_example, name)):
                problems.append(f"{where}: {name!r} is empty")
        if feedback_example.answer not in ("A", "B"):
            problems.append(
                f"{where}: 'answer' must be 'A' or 'B', found {feedback_example.answer!r}"
            )
        if feedback_example.rationale is not None and _blank(feedback_example.rationale):
            problems.append(f"{where}: 'rationale' is empty (leave it out instead)")
    return problems


def validate_constitution(constitution: Constitution, source: str = "") -> Constitution:
    """Return ``constitution`` if it is valid, else raise :class:`ConstitutionError`.

    ``source`` (a file name) starts the message; see :func:`constitution_problems`.
    """
    problems = constitution_problems(constitution)
    if problems:
        raise ConstitutionError(source, problems)
    return constitution
