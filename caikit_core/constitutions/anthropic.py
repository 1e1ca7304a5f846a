"""The supplementary prompt files of Bai et al. 2022 (arXiv 2212.08073).

A directory holding any of ``CritiqueRevisionInstructions.json`` (ids are its
keys, e.g. ``harmful0``), ``RLMadisonInstructions.json`` (a list; ids are
``feedback0``, ``feedback1``, ...), ``CritiqueRevisionFewShotPrompts.json``,
``RLMadisonFewShotPrompts.json`` and ``RLMadisonPrecogFewShotPrompts.json``, or a
single one of those files. The prompt framing (``"\\n\\nCritiqueRequest: "``,
``"\\n\\nCritique:"``, ``"RevisionRequest:"``, ``"Revision:"``, ``" Options:"``) is
stripped so that principle texts are clean; writing adds it back. The few-shot
comparisons carry no principle of their own (``RLMadisonFewShotPrompts.json`` has
none, ``RLMadisonPrecogFewShotPrompts.json`` has a ``{}`` slot for it).

What cannot be mapped exactly
-----------------------------
* ``RLMadisonFewShotPrompts.json`` lists ``corrects`` and ``incorrects`` without an
  order of presentation. Each (correct, incorrect) pair becomes one example; the
  correct response is option A in the 1st, 3rd, ... example and option B in the
  2nd, 4th, ..., so that the few-shot answers are balanced.
* In ``RLMadisonPrecogFewShotPrompts.json`` the rationale follows the cue "Let's
  think step by step:", which is dropped (it is prompt framing, not reasoning).
  The conversations there label turns ``H:`` / ``A:``; they are stored with
  ``Human:`` / ``Assistant:`` labels like the other transcripts. The file's small
  framing variations (one example lacks the leading blank line, one says "a human
  and an assistant" without "(H)"/"(A)") are not kept; writing uses one form.
* Writing cannot keep few-shot comparisons that have a principle of their own,
  nor system turns, nor the constitution's name; principle ids of feedback
  principles become ``feedback<i>``. It refuses to drop content (examples, their
  principle text or turns) unless ``lossy=True``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from caikit_core.constitution import (
    Constitution,
    CritiqueFewShot,
    CritiqueRevisionPrinciple,
    FeedbackFewShot,
    FeedbackPrinciple,
)
from caikit_core.constitutions.caikit import SECTIONS
from caikit_core.constitutions.common import (
    entry_problems,
    few_shot_conversation,
    read_json,
    to_json,
    write_text,
)
from caikit_core.converter import show, structure
from caikit_core.errors import ConstitutionError
from caikit_core.io.transcripts import (
    HUMAN_ASSISTANT,
    SHORT_LABELS,
    parse_transcript,
    render_transcript,
    split_transcript,
)
from caikit_core.records import Conversation, Message

__all__ = [
    "CRITIQUE_FEW_SHOT",
    "CRITIQUE_REVISION",
    "FEEDBACK",
    "FEEDBACK_COT_FEW_SHOT",
    "FEEDBACK_FEW_SHOT",
    "FILES",
    "file_kind",
    "losses",
    "read",
    "write",
]

CRITIQUE_REVISION: Final = "CritiqueRevisionInstructions.json"

FEEDBACK: Final = "RLMadisonInstructions.json"

CRITIQUE_FEW_SHOT: Final = "CritiqueRevisionFewShotPrompts.json"

FEEDBACK_FEW_SHOT: Final = "RLMadisonFewShotPrompts.json"

FEEDBACK_COT_FEW_SHOT: Final = "RLMadisonPrecogFewShotPrompts.json"

FILES: Final = (
    CRITIQUE_REVISION,
    FEEDBACK,
    CRITIQUE_FEW_SHOT,
    FEEDBACK_FEW_SHOT,
    FEEDBACK_COT_FEW_SHOT,
)
"""The file names of Anthropic's published prompt files, in load order."""


def read(path: Path) -> Constitution:
    """Read a directory of Anthropic's prompt files, or one of them (unvalidated)."""
    if path.is_dir():
        files = [path / name for name in FILES if (path / name).is_file()]
        if not files:
            raise ConstitutionError(
                str(path), f"holds none of Anthropic's prompt files ({', '.join(FILES)})"
            )
    else:
        files = [path]
    parts: dict[str, list[Any]] = {section: [] for section in SECTIONS}
    for file in files:
        data = read_json(file)
        kind = file.name if file.name in FILES else file_kind(data)
        if kind is None:
            raise ConstitutionError(
                str(file), "not one of Anthropic's prompt files: " + ", ".join(FILES)
            )
        section, parse = _PARSERS[kind]
        problems: list[str] = []
        parts[section].extend(parse(data, problems))
        if problems:
            raise ConstitutionError(str(file), problems)
    return Constitution(name=path.stem, **{k: tuple(v) for k, v in parts.items()})


def file_kind(data: Any) -> str | None:
    """Which Anthropic prompt file ``data`` looks like (its file name), if any."""
    if isinstance(data, Mapping) and data and all(isinstance(v, Mapping) for v in data.values()):
        if all("edit_request" in v or "prompt" in v for v in data.values()):
            return CRITIQUE_REVISION
        return None
    if not isinstance(data, list) or not data:
        return None
    if all(isinstance(item, str) for item in data):
        if any("CritiqueRequest:" in item for item in data):
            return CRITIQUE_FEW_SHOT
        return FEEDBACK
    if all(isinstance(item, Mapping) for item in data):
        if any("corrects" in item or "incorrects" in item for item in data):
            return FEEDBACK_FEW_SHOT
        if all(set(item) == {"prompt"} for item in data):
            return FEEDBACK_COT_FEW_SHOT
    return None


def _unframe(text: str, request_label: str, answer_label: str) -> str:
    """Strip ``"\\n\\n<request_label>: "`` and ``"\\n\\n<answer_label>:"`` framing."""
    text = text.strip()
    if text.startswith(f"{request_label}:"):
        text = text[len(request_label) + 1 :]
    if text.endswith(f"{answer_label}:"):
        text = text[: -len(answer_label) - 1]
    return text.strip()


@attrs.frozen
class _Instruction:
    """An entry of ``CritiqueRevisionInstructions.json``."""

    prompt: Any  # the critique request, or a list holding exactly one
    edit_request: str


@attrs.frozen
class _Comparisons:
    """An entry of ``RLMadisonFewShotPrompts.json``."""

    prompt: str
    corrects: tuple[str, ...]
    incorrects: tuple[str, ...]


@attrs.frozen
class _Reasoned:
    """An entry of ``RLMadisonPrecogFewShotPrompts.json``."""

    prompt: str


def _entries(
    data: Any, cls: Any, problems: list[str], *, by_key: bool = False
) -> list[tuple[str, Any, Any]]:
    """``(where, key, entry)`` for each entry of a file, structured as ``cls``: the
    items of a list (``where`` is ``[index]``) or, ``by_key``, the values of an
    object (``where`` is the quoted key). A bad entry adds its problem lines instead."""
    if not isinstance(data, Mapping if by_key else list):
        problems.append(f"expected {'an object' if by_key else 'a list'}, found {show(data)}")
        return []
    items: Iterable[tuple[Any, Any]] = (
        data.items() if isinstance(data, Mapping) else enumerate(data)
    )
    out = []
    for key, raw in items:
        where = repr(key) if by_key else f"[{key}]"
        try:
            out.append((where, key, structure(raw, cls)))
        except Exception as exc:
            problems.extend(entry_problems(where, exc))
    return out


def _parse_critique_revision(data: Any, problems: list[str]) -> list[CritiqueRevisionPrinciple]:
    out = []
    for where, key, entry in _entries(data, _Instruction, problems, by_key=True):
        prompt = entry.prompt
        if isinstance(prompt, list) and len(prompt) != 1:
            problems.append(
                f"{where}: 'prompt' must hold exactly one critique request, found {len(prompt)}"
            )
            continue
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        if not isinstance(prompt, str):
            problems.append(f"{where}: 'prompt': expected a string, found {show(prompt)}")
            continue
        critique = _unframe(prompt, "CritiqueRequest", "Critique")
        revision = _unframe(entry.edit_request, "RevisionRequest", "Revision")
        out.append(CritiqueRevisionPrinciple(str(key), critique, revision))
    return out


def _parse_feedback(data: Any, problems: list[str]) -> list[FeedbackPrinciple]:
    return [
        FeedbackPrinciple(f"feedback{index}", text.strip().removesuffix("Options:").strip())
        for _, index, text in _entries(data, str, problems)
    ]


_CRITIQUE_LABELS: Final = (
    "Human",
    "Assistant",
    "CritiqueRequest",
    "Critique",
    "RevisionRequest",
    "Revision",
)

_CRITIQUE_TAIL: Final = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")


def _parse_critique_few_shot(data: Any, problems: list[str]) -> list[CritiqueFewShot]:
    out = []
    for where, _, text in _entries(data, str, problems):
        try:
            parts = split_transcript(text, _CRITIQUE_LABELS)
        except ValueError:
            problems.append(f"{where}: expected a transcript starting with Human:")
            continue
        if parts and parts[-1] == ("Human", ""):
            parts.pop()  # the examples end by opening the next conversation
        labels = tuple(label for label, _ in parts)
        head, tail = parts[:-4], parts[-4:]
        if (
            labels[-4:] != _CRITIQUE_TAIL
            or not head
            or any(label not in ("Human", "Assistant") for label, _ in head)
            or head[-1][0] != "Assistant"
        ):
            problems.append(
                f"{where}: expected Human/Assistant turns ending with an Assistant turn, then "
                f"{', '.join(_CRITIQUE_TAIL)}; found {', '.join(labels)}"
            )
            continue
        out.append(
            CritiqueFewShot(
                messages=tuple(
                    Message("user" if label == "Human" else "assistant", content)
                    for label, content in head
                ),
                critique_request=tail[0][1],
                critique=tail[1][1],
                revision_request=tail[2][1],
                revision=tail[3][1],
            )
        )
    return out


def _comparison_prompt(text: str) -> str | None:
    """The canonical transcript of a comparison prompt ending with a human turn."""
    try:
        messages = parse_transcript(text)
    except ValueError:
        return None
    if not messages or messages[-1].role != "user":
        return None
    return render_transcript(messages)


def _parse_feedback_few_shot(data: Any, problems: list[str]) -> list[FeedbackFewShot]:
    out: list[FeedbackFewShot] = []
    for where, _, entry in _entries(data, _Comparisons, problems):
        prompt = _comparison_prompt(entry.prompt)
        if prompt is None:
            problems.append(
                f"{where}: 'prompt': expected a Human/Assistant transcript ending with a "
                f"Human turn, found {show(entry.prompt)}"
            )
            continue
        if not entry.corrects or not entry.incorrects:
            problems.append(f"{where}: 'corrects' and 'incorrects' must not be empty")
            continue
        for correct, incorrect in itertools.product(entry.corrects, entry.incorrects):
            correct_first = len(out) % 2 == 0
            out.append(
                FeedbackFewShot(
                    prompt=prompt,
                    response_a=(correct if correct_first else incorrect).strip(),
                    response_b=(incorrect if correct_first else correct).strip(),
                    principle="",
                    answer="A" if correct_first else "B",
                )
            )
    return out


_COT_PATTERN: Final = re.compile(
    r"\A\s*Human:\s*Consider the following conversation between a human(?: \(H\))? "
    r"and an assistant(?: \(A\))?:\s*\n(?P<conversation>.*?)\n\s*\{\}\s*\n"
    r"\s*\(A\) \[\[\[(?P<a>.*?)\]\]\]\s*\n"
    r"\s*\(B\) \[\[\[(?P<b>.*?)\]\]\]\s*\n"
    r"\s*Assistant:\s*(?:Let's think step by step:)?(?P<rationale>.*?)"
    r"\n\s*Human:\s*So the answer is:\s*\((?P<answer>[AB])\)\s*\Z",
    re.DOTALL,
)

_COT_LEAD: Final = "Consider the following conversation between a human (H) and an assistant (A):"

_COT_CUE: Final = "Let's think step by step:"


def _parse_feedback_cot_few_shot(data: Any, problems: list[str]) -> list[FeedbackFewShot]:
    out = []
    for where, _, entry in _entries(data, _Reasoned, problems):
        match = _COT_PATTERN.match(entry.prompt)
        conversation: Conversation = ()
        if match:
            try:
                conversation = parse_transcript(match["conversation"].strip(), SHORT_LABELS)
            except ValueError:
                conversation = ()
        if not match or not conversation or conversation[-1].role != "user":
            problems.append(
                f"{where}: 'prompt': expected 'Human: Consider the following conversation ...', "
                "H:/A: turns ending with H:, '{}', '(A) [[[...]]]', '(B) [[[...]]]', "
                "'Assistant: <reasoning>' and 'Human: So the answer is: (A|B)'"
            )
            continue
        out.append(
            FeedbackFewShot(
                prompt=render_transcript(conversation),
                response_a=match["a"].strip(),
                response_b=match["b"].strip(),
                principle="",
                answer=match["answer"],
                rationale=match["rationale"].strip(),
            )
        )
    return out


_PARSERS: Final[dict[str, tuple[str, Callable[[Any, list[str]], Sequence[Any]]]]] = {
    CRITIQUE_REVISION: ("critique_revision", _parse_critique_revision),
    FEEDBACK: ("feedback", _parse_feedback),
    CRITIQUE_FEW_SHOT: ("critique_few_shot", _parse_critique_few_shot),
    FEEDBACK_FEW_SHOT: ("feedback_few_shot", _parse_feedback_few_shot),
    FEEDBACK_COT_FEW_SHOT: ("feedback_few_shot", _parse_feedback_cot_few_shot),
}


def losses(constitution: Constitution) -> list[str]:
    """What the Anthropic files cannot hold of ``constitution``, one phrase each."""
    losses = []
    for index, example in enumerate(constitution.critique_few_shot):
        if any(m.role not in HUMAN_ASSISTANT for m in example.messages):
            losses.append(f"the system turns of critique_few_shot[{index}]")
    for index, feedback_example in enumerate(constitution.feedback_few_shot):
        if not _can_hold(feedback_example):
            losses.append(
                f"feedback_few_shot[{index}], whose prompt does not end with a human turn"
            )
        elif feedback_example.principle.strip():
            losses.append(f"the principle of feedback_few_shot[{index}]")
    return losses


def _can_hold(example: FeedbackFewShot) -> bool:
    """Whether the conversation of a few-shot comparison can be written and read back."""
    try:
        messages = few_shot_conversation(example)
    except ValueError:
        return False
    return bool(messages) and messages[-1].role == "user"


def _files(constitution: Constitution) -> dict[str, Any]:
    """The Anthropic files' contents for a constitution (only the non-empty ones)."""
    files: dict[str, Any] = {}
    if constitution.critique_revision:
        files[CRITIQUE_REVISION] = {
            p.id: {
                "prompt": [f"\n\nCritiqueRequest: {p.critique}\n\nCritique:"],
                "edit_request": f"\n\nRevisionRequest: {p.revision}\n\nRevision:",
            }
            for p in constitution.critique_revision
        }
    if constitution.feedback:
        files[FEEDBACK] = [f"\n{p.text} Options:" for p in constitution.feedback]
    if constitution.critique_few_shot:
        files[CRITIQUE_FEW_SHOT] = [
            "\n\n"
            + render_transcript([m for m in e.messages if m.role in HUMAN_ASSISTANT])
            + f"\n\nCritiqueRequest: {e.critique_request}\n\nCritique: {e.critique}"
            + f"\n\nRevisionRequest: {e.revision_request}\n\nRevision: {e.revision}\n\nHuman:"
            for e in constitution.critique_few_shot
        ]
    plain, reasoned = [], []
    for example in filter(_can_hold, constitution.feedback_few_shot):
        conversation = few_shot_conversation(example)
        correct, incorrect = example.response_a, example.response_b
        if example.answer == "B":
            correct, incorrect = incorrect, correct
        if example.rationale is None:
            plain.append(
                {
                    "prompt": f"\n\n{render_transcript(conversation)}\n\nAssistant:",
                    "corrects": [correct],
                    "incorrects": [incorrect],
                }
            )
        else:
            turns = render_transcript(conversation, SHORT_LABELS)
            reasoned.append(
                {
                    "prompt": f"\n\nHuman: {_COT_LEAD}\n\n{turns}\n\n{{}}\n"
                    f" (A) [[[{example.response_a}]]]\n (B) [[[{example.response_b}]]]\n\n"
                    f"Assistant: {_COT_CUE} {example.rationale}\n\n"
                    f"Human:\nSo the answer is: ({example.answer})"
                }
            )
    if plain:
        files[FEEDBACK_FEW_SHOT] = plain
    if reasoned:
        files[FEEDBACK_COT_FEW_SHOT] = reasoned
    return files


def write(constitution: Constitution, target: Path) -> None:
    """Write the Anthropic files into directory ``target``; remove those not written."""
    if target.exists() and not target.is_dir():
        raise ConstitutionError(str(target), "the anthropic format is written to a directory")
    target.mkdir(parents=True, exist_ok=True)
    files = _files(constitution)
    for name in FILES:
        if name in files:
            write_text(target / name, to_json(files[name]))
        else:
            (target / name).unlink(missing_ok=True)
