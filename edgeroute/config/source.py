"""YAML text to data, remembering where each value is.

Duplicate mapping keys are an error (PyYAML lets the last one win silently), and every
key and list item keeps its line and column so that an error about a path in the config
(`models.m.fallbacks[0]`) can point at the place in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError

Loc = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` entries may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                continue  # the base class reports unhashable keys
            if key in first:
                line = first[key].start_mark.line + 1
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given on line {line}; YAML would silently keep the last)",
                    key_node.start_mark,
                )
            first[key] = key_node
        return super().construct_mapping(node, deep=deep)


@dataclass(slots=True, frozen=True)
class Positions:
    """Line and column (1-based) of each key and list item, by its path in the data."""

    at: dict[Loc, tuple[int, int]]

    def of(self, loc: Loc) -> tuple[int, int] | None:
        """Where `loc` is, or its closest enclosing path that is in the file (a missing key: its mapping)."""
        for n in range(len(loc), -1, -1):
            if (pos := self.at.get(tuple(loc[:n]))) is not None:
                return pos
        return None

    def find(self, path: str) -> tuple[int, int] | None:
        """Where a path as the checks write it (`models.gpt-4.1.fallbacks[0]`) is: the deepest part of it
        that is in the file. Names may contain dots, so each split is tried against the file's keys."""
        parts = path.split(".")
        deepest, best = 0, self.at.get(())
        todo: list[tuple[int, Loc]] = [(0, ())]
        while todo:
            i, loc = todo.pop()
            for j in range(i + 1, len(parts) + 1):
                name, *indexes = ".".join(parts[i:j]).split("[")
                here: Loc = (*loc, name) if name else loc
                for index in indexes:
                    digits = index.rstrip("]")
                    here = (*here, int(digits)) if digits.isdigit() else here
                if here in self.at:
                    if len(here) > deepest:
                        deepest, best = len(here), self.at[here]
                    todo.append((j, here))
        return best


def _walk(node: yaml.Node, loc: Loc, out: dict[Loc, tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                here = (*loc, key_node.value)
                out.setdefault(here, (key_node.start_mark.line + 1, key_node.start_mark.column + 1))
                _walk(value_node, here, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            here = (*loc, i)
            out.setdefault(here, (item.start_mark.line + 1, item.start_mark.column + 1))
            _walk(item, here, out)


# Values that aliases may add to a document beyond its own nodes. An alias shares its node,
# but walking the document (here, for positions; in validation; in the JSON handed to the
# core) visits it once per path: nine aliases to nine aliases ... six deep, 288 bytes, are
# 590,000 values (a second and 250 MB), eight deep would exhaust the host's memory.
MAX_ALIASED_VALUES = 100_000


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_aliases(root: yaml.Node) -> None:
    """Raises a `ComposerError` when aliases make a value contain itself or expand the
    document by more than `MAX_ALIASED_VALUES` values. Linear in the distinct nodes (the
    size of each is counted once) and iterative (no recursion limit)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # the nodes being counted: a child among them is an ancestor
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        k = id(node)
        if counted:
            open_.discard(k)
            sizes[k] = 1 + sum(sizes[id(c)] for c in _children(node))
            continue
        if k in sizes:
            continue
        if k in open_:
            raise ConstructorError(None, None, "an alias makes a value contain itself", node.start_mark)
        open_.add(k)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    if sizes[id(root)] - len(sizes) > MAX_ALIASED_VALUES:
        raise ConstructorError(
            None, None, f"aliases expand the document by more than {MAX_ALIASED_VALUES:,} values", root.start_mark
        )


def load_yaml(text: str) -> tuple[Any, Positions]:
    """The data in `text` and where its values are; raises `yaml.YAMLError` (with a mark) on bad
    YAML, on aliases that expand it too far or make a value contain itself, and on nesting
    too deep to read."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(node)
        data = None if node is None else loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError("the YAML is nested too deeply") from None
    finally:
        loader.dispose()
    at: dict[Loc, tuple[int, int]] = {}
    if node is not None:
        at[()] = (node.start_mark.line + 1, node.start_mark.column + 1)
        _walk(node, (), at)
    return data, Positions(at)
