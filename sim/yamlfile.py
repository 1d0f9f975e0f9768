"""YAML reading for configuration files: safe, and a repeated key is an error.

PyYAML keeps the last of two equal keys in a mapping, so a scenario that sets `duration_s`
twice silently runs with the second value. Here it fails like any malformed YAML, with the
line of the repeated key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sim.errors import RouteSimError


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *anchor` keys may be overridden (that is its point), but a second
                # `<<` in one mapping would silently drop the first: merge a list instead.
                key = "<<"
            else:
                key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e3 and 2e-1 as text: a float needs a dot and a signed exponent
# there. YAML 1.2 and every other reader users know take them as numbers, so do we (a quoted
# '1e3' stays text).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that a key repeated within one mapping raises a
    yaml.YAMLError whose `problem_mark` is the repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml_file(path: Path, error: type[RouteSimError], source: str) -> Any:
    """The parsed YAML document of a configuration file; any failure to read or parse it
    (unreadable, not UTF-8, malformed, nested beyond Python's recursion limit) is an
    `error` naming `source` and, for malformed YAML, the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read: {exc}", source=source) from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"malformed YAML{where}: {problem}", source=source) from None
    except RecursionError:
        raise error("malformed YAML: nested too deeply", source=source) from None
