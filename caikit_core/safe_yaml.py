"""YAML reading for run files and constitutions: ``yaml.SafeLoader`` only, with a bound.

An alias repeats the value its anchor names, so a few hundred bytes of nested
aliases (an "alias bomb", as the billion laughs are for XML) stand for hundreds of
millions of values: cheap to load, since PyYAML shares the repeated objects, but
ruinous for anything that walks them (a repr in an error message, JSON recording,
structuring). :func:`load` composes the document, counts its values as if every
alias were expanded, and refuses a document above :data:`MAX_VALUES` (or one where
an alias refers to the value it is inside) before constructing anything. Every
failure is a :class:`yaml.YAMLError`, so callers report all YAML problems alike.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_VALUES", "YAMLRefused", "load"]

#: the most values (scalars, lists, tables) a YAML document may hold, aliases expanded;
#: a run file holds hundreds, a large constitution some thousands
MAX_VALUES = 100_000


class YAMLRefused(yaml.YAMLError):
    """A document refused: too large once its aliases are expanded, referring to itself,
    nested too deeply, or holding a value Python cannot build (a 5000-digit integer)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_VALUES) -> int:
    """How many values ``root`` holds with every alias expanded (at most ``limit + 1``:
    counting stops there). Shared nodes are counted once per use, but walked once.

    :raises YAMLRefused: above ``limit``, or an alias inside the value it names.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            active.discard(key)
            sizes[key] = total
            if total > limit:
                raise YAMLRefused(
                    f"aliases expand the document to more than {limit} values "
                    "(an alias bomb?); write the values out instead"
                )
            continue
        if key in sizes:
            continue
        if key in active:
            mark = node.start_mark
            raise YAMLRefused(
                "an alias refers to the value it is inside "
                f"(line {mark.line + 1}, column {mark.column + 1})"
            )
        active.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in active:
                mark = child.start_mark
                raise YAMLRefused(
                    "an alias refers to the value it is inside "
                    f"(line {mark.line + 1}, column {mark.column + 1})"
                )
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents above :data:`MAX_VALUES` values with
    aliases expanded, or nested too deeply to read.

    :raises yaml.YAMLError: a syntax error, or a document refused as above.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLRefused("the document is nested too deeply") from None
        if node is None:
            return None
        expanded_size(node)
        try:
            return loader.construct_document(node)
        except RecursionError:
            raise YAMLRefused("the document is nested too deeply") from None
        except ValueError as exc:  # int() of thousands of digits
            raise YAMLRefused(f"a value cannot be read: {exc}") from None
    finally:
        loader.dispose()
