"""Fixed-shape JSON laid out as a template: the keys and punctuation as fixed text spans, each value a
hole under its own schema (response_format `"layout": "keys"`).

A schema has a fixed shape when it is an object whose properties are all required and no others
allowed (`additionalProperties: false`, as OpenAI's strict mode asks): then every key, colon, comma
and brace is known before the model writes anything. Nested objects of fixed shape are laid out the
same way; any other value (a string, number, enum, array, union, optional-field object) is one hole
whose grammar is that value's schema (with the root's `$defs`).

    {"type": "object", "additionalProperties": false, "required": ["name", "age"],
     "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    ->  '{"name":' [hole: string] ',"age":' [hole: integer] '}'

A full-attention model then diffuses all values at once, each hole under its own grammar (the
grammar stage keeps each hole a committed prefix of its own); a block or causal model fills them in
order as a chain (frontend/template.py). The output is the same compact JSON the plain layout writes
("," and ":" separators, no whitespace).
"""
from __future__ import annotations

import json

from .formats import FormatError, OutputFormat

LAYOUTS = ("prefix", "keys")


def fixed_shape(schema) -> bool:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return False
    props = schema.get("properties")
    if not isinstance(props, dict) or not props or schema.get("additionalProperties") is not False:
        return False
    if sorted(schema.get("required") or []) != sorted(props):
        return False
    return not (set(schema) & {"anyOf", "oneOf", "allOf", "$ref", "patternProperties", "if", "not", "enum", "const"})


def schema_template(fmt: OutputFormat) -> tuple[list, list[OutputFormat]]:
    """(segments: text spans and None for each hole, each hole's format)."""
    root = fmt.value
    if not fixed_shape(root):
        raise FormatError("response_format.layout 'keys' needs a schema of fixed shape: an object whose properties "
                          "are all required, with additionalProperties false; use the default layout for this schema")
    defs = {k: root[k] for k in ("$defs", "definitions") if k in root}
    segments: list = []
    formats: list[OutputFormat] = []

    def text(s: str) -> None:
        if segments and isinstance(segments[-1], str):
            segments[-1] += s
        else:
            segments.append(s)

    def lay_out(schema) -> None:
        if fixed_shape(schema):
            text("{")
            for i, (key, value) in enumerate(schema["properties"].items()):
                text(("," if i else "") + json.dumps(key, ensure_ascii=False) + ":")
                lay_out(value)
            text("}")
            return
        sub = dict(schema) if isinstance(schema, dict) else {}
        sub.update({k: v for k, v in defs.items() if k not in sub})
        segments.append(None)
        formats.append(OutputFormat.json_schema(sub, strict=fmt.strict, name=fmt.name))

    lay_out(root)
    return segments, formats
