"""Human/Assistant transcripts: the one parser and renderer every format uses."""

from __future__ import annotations

import pytest

from caikit_core.io.transcripts import (
    SHORT_LABELS,
    first_human_turn,
    parse_transcript,
    render_transcript,
    split_transcript,
)
from caikit_core.records import Message, conversation


def test_parse_and_render_round_trip() -> None:
    messages = parse_transcript(
        "\n\nHuman: hi\nthere\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    )
    assert messages == conversation(("user", "hi\nthere"), ("assistant", "hello"), ("user", "bye"))
    assert render_transcript(messages) == "Human: hi\nthere\n\nAssistant: hello\n\nHuman: bye"
    assert parse_transcript(render_transcript(messages)) == messages


def test_short_labels() -> None:
    messages = parse_transcript("H: is it safe?\n\nA: yes\n\nH: sure?", SHORT_LABELS)
    assert messages == conversation(
        ("user", "is it safe?"), ("assistant", "yes"), ("user", "sure?")
    )
    assert render_transcript(messages, SHORT_LABELS) == "H: is it safe?\n\nA: yes\n\nH: sure?"


def test_other_roles_are_refused_or_labelled_by_name() -> None:
    turns = [Message("system", " be brief "), Message("user", " q ")]
    with pytest.raises(ValueError, match="cannot hold a 'system' turn"):
        render_transcript(turns)
    assert render_transcript(turns, other_roles=True) == "System: be brief\n\nHuman: q"


def test_text_without_a_leading_label_is_not_a_transcript() -> None:
    with pytest.raises(ValueError, match="starting with Human:"):
        parse_transcript("no labels here")
    with pytest.raises(ValueError):
        parse_transcript("preamble\n\nHuman: hi")


def test_split_prefers_the_longer_label() -> None:
    text = "Human: q\n\nAssistant: a\n\nCritiqueRequest: why?\n\nCritique: because"
    labels = ("Human", "Assistant", "Critique", "CritiqueRequest")
    assert split_transcript(text, labels) == [
        ("Human", "q"),
        ("Assistant", "a"),
        ("CritiqueRequest", "why?"),
        ("Critique", "because"),
    ]


def test_first_human_turn() -> None:
    assert first_human_turn("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: more") == "hi there"
    assert first_human_turn("\n\nHuman: only") == "only"
    assert first_human_turn("\n\nAssistant: first\n\nHuman: then") == "then"
    assert first_human_turn("no turns") is None
    assert first_human_turn("\n\nAssistant: no human") is None
