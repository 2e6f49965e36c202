"""Rewrites of the JSON schemas clients send, before they are compiled into grammars.

close_objects(schema)                  # objects closed to properties the schema does not name
scoped_refs(params, "#/$defs/tool_0")  # a tool's schema moved inside a larger one, its $refs with it
"""

from __future__ import annotations

from typing import Callable

# NOTE: keywords whose values are data, not schemas: nothing inside them is rewritten; and keywords
# whose values map names to schemas (a property called "enum" is still a schema)
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})


def _walk(node, fix: Callable[[dict, bool], dict], in_all_of: bool = False):
    """`node` with fix(schema, is_an_allOf_part) applied to every schema object in it, innermost first."""
    if isinstance(node, list):
        return [_walk(v, fix) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in _DATA_KEYWORDS:
            out[k] = v
        elif k in _NAMED_SCHEMAS and isinstance(v, dict):
            out[k] = {name: _walk(sub, fix) for name, sub in v.items()}
        elif k == "allOf" and isinstance(v, list):
            out[k] = [_walk(sub, fix, True) for sub in v]
        else:
            out[k] = _walk(v, fix)
    return fix(out, in_all_of)


def close_objects(schema):
    """`schema` with every object that names its properties closed to others, and every tuple
    (prefixItems) to more items, unless the schema itself says what else may come.

    NOTE: JSON Schema lets an object carry any property it does not name, and a small model fills
    that freedom with invented keys until max_tokens cuts it; clients that send a pydantic model's
    schema mean exactly the fields it names (vLLM's default backend closes objects the same way).
    allOf parts are left open: each names only part of the object."""

    def close(s: dict, in_all_of: bool) -> dict:
        says = ("additionalProperties", "unevaluatedProperties", "patternProperties", "allOf")
        if isinstance(s.get("properties"), dict) and not in_all_of and not any(k in s for k in says):
            s["additionalProperties"] = False
        if isinstance(s.get("prefixItems"), list) and "items" not in s and "unevaluatedItems" not in s:
            s["items"] = False
        return s

    return _walk(schema, close)


def scoped_refs(schema, prefix: str):
    """`schema` moved under `prefix` (a JSON pointer such as "#/$defs/tool_0") of a larger schema: its
    own references ("#", "#/$defs/Address") rewritten to point inside it there."""

    def rescope(s: dict, _: bool) -> dict:
        ref = s.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            s["$ref"] = prefix + ref[1:]
        return s

    return _walk(schema, rescope)
