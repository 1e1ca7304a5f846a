"""Human/Assistant transcripts: conversations written as labelled plain text.

Anthropic's data (hh-rlhf, the prompt files of Bai et al. 2022) writes a
conversation as ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``; the
chain-of-thought few-shot prompts use ``H:`` / ``A:``. This module is the one
place that reads and writes that form: the constitution formats, the prompt
readers and the labellers' questions all use it.

Turns start at the beginning of the text or after a blank line, so a turn whose
text itself contains ``"\\n\\nHuman:"`` cannot be told apart from two turns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from caikit_core.converter import show
from caikit_core.records import Conversation, Message

__all__ = [
    "HUMAN_ASSISTANT",
    "SHORT_LABELS",
    "first_human_turn",
    "parse_transcript",
    "render_transcript",
    "split_transcript",
]

#: Chat role -> transcript label, as in hh-rlhf and Anthropic's prompt files.
HUMAN_ASSISTANT: Final[Mapping[str, str]] = {"user": "Human", "assistant": "Assistant"}
#: The short labels of Anthropic's chain-of-thought few-shot prompts.
SHORT_LABELS: Final[Mapping[str, str]] = {"user": "H", "assistant": "A"}


def split_transcript(text: str, labels: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(label, text)`` turns of a transcript whose turns start with ``Label:``.

    Each turn's text is stripped. Any of ``labels`` may start a turn (longer
    labels are tried first, so ``"Critique"`` and ``"CritiqueRequest"`` coexist).

    :raises ValueError: the text does not start with one of ``labels``.
    """
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    pattern = re.compile(rf"(?:\A\s*|\n\n)({alternatives}):")
    matches = list(pattern.finditer(text))
    if not matches or matches[0].start() != 0:
        raise ValueError(f"expected a transcript starting with {labels[0]}:, found {show(text)}")
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return [(m.group(1), text[m.end() : end].strip()) for m, end in zip(matches, ends, strict=True)]


def parse_transcript(text: str, labels: Mapping[str, str] = HUMAN_ASSISTANT) -> Conversation:
    """The messages of a transcript; an empty last turn (a prompt's open
    ``"\\n\\nAssistant:"``) is dropped.

    :param labels: chat role -> label (:data:`HUMAN_ASSISTANT` or :data:`SHORT_LABELS`).
    :raises ValueError: the text does not start with one of the labels.
    """
    roles = {label: role for role, label in labels.items()}
    parts = split_transcript(text, list(labels.values()))
    if parts and not parts[-1][1]:
        parts.pop()
    return tuple(Message(roles[label], content) for label, content in parts)


def render_transcript(
    messages: Sequence[Message],
    labels: Mapping[str, str] = HUMAN_ASSISTANT,
    *,
    other_roles: bool = False,
) -> str:
    """``"Human: ...\\n\\nAssistant: ..."`` for ``messages``, each turn's text stripped.

    :param labels: chat role -> label (:data:`HUMAN_ASSISTANT` or :data:`SHORT_LABELS`).
    :param other_roles: label a turn of any other role (e.g. ``system``) by its
        capitalised name, instead of refusing it.
    :raises ValueError: a turn has a role without a label and ``other_roles`` is false.
    """
    parts = []
    for message in messages:
        label = labels.get(message.role)
        if label is None:
            if not other_roles:
                raise ValueError(f"a transcript cannot hold a {message.role!r} turn")
            label = message.role.capitalize()
        parts.append(f"{label}: {message.content.strip()}")
    return "\n\n".join(parts)


def first_human_turn(text: str) -> str | None:
    """The text of the first ``Human:`` turn of a transcript (as an hh-rlhf
    ``chosen`` column holds), or ``None`` if it is not a transcript or has none."""
    try:
        messages = parse_transcript(text)
    except ValueError:
        return None
    return next((m.content for m in messages if m.role == "user"), None)
