"""What a caller may ask the output to be, and the llguidance grammar that says it.

    OutputFormat.json_schema(schema, strict=True)   OpenAI's response_format json_schema
    OutputFormat.json_object()                      OpenAI's response_format json_object
    OutputFormat.regex(r"\\d{3}-\\d{4}")            extension: the whole output matches the regex
    OutputFormat.choice(["yes", "no"])              extension: exactly one of these strings
    OutputFormat.grammar(lark_text)                 extension: a context-free grammar in Lark syntax

`parse_response_format` reads the HTTP shape (`{"type": "json_schema", "json_schema": {...}}` and
our `regex`, `choice`, `grammar` types); `grammar_text` turns a format into llguidance's grammar
(JSON compiled compactly: no whitespace between tokens, "," and ":" separators). Every error is a
`FormatError` whose message starts with the field it is about.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# JSON laid out compactly: every token the model writes is content, and a budget goes further.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class FormatError(UserError):
    """A response_format the request cannot have; the message names the field."""


@dataclass(frozen=True)
class OutputFormat:
    kind: str
    value: Any = None  # the schema (dict), regex (str), choices (tuple of str) or Lark grammar (str)
    strict: bool = False  # json_schema: unsupported schema keywords are errors (False, OpenAI's default: ignored)
    name: str | None = None
    # json_schema: "prefix" (the output is one grammar, written left to right) or "keys" (a schema of
    # fixed shape laid out as a template: keys fixed, each value a hole under its own schema; layout.py)
    layout: str = "prefix"

    @classmethod
    def json_schema(cls, schema: dict, *, strict: bool = False, name: str | None = None,
                    layout: str = "prefix") -> "OutputFormat":
        if not isinstance(schema, dict):
            raise FormatError("response_format.json_schema.schema must be a JSON object (a JSON Schema)")
        if layout not in ("prefix", "keys"):
            raise FormatError(f"response_format.layout {layout!r}: choose 'prefix' (default) or 'keys'")
        return cls("json_schema", schema, strict, name, layout)

    @classmethod
    def json_object(cls) -> "OutputFormat":
        return cls("json_object", {"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "OutputFormat":
        if not isinstance(pattern, str) or not pattern:
            raise FormatError("response_format.regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options) -> "OutputFormat":
        if (not isinstance(options, (list, tuple)) or not options
                or not all(isinstance(o, str) and o for o in options)):
            raise FormatError("response_format.choice must be a non-empty list of non-empty strings")
        return cls("choice", tuple(options))

    @classmethod
    def grammar(cls, lark: str) -> "OutputFormat":
        if not isinstance(lark, str) or not lark.strip():
            raise FormatError("response_format.grammar must be a non-empty Lark grammar (a string)")
        if "<[" in lark:
            raise FormatError("response_format.grammar may not name token ids (<[...]>); write the text instead")
        return cls("grammar", lark)

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")


def _keys(obj: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise FormatError(f"{where}: unknown field {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")


def parse_response_format(obj) -> OutputFormat | None:
    """The HTTP `response_format` object -> OutputFormat (None for absent or `{"type": "text"}`)."""
    if obj is None:
        return None
    if isinstance(obj, OutputFormat):
        return obj
    if not isinstance(obj, dict):
        raise FormatError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = obj.get("type")
    if kind == "text":
        _keys(obj, {"type"}, "response_format")
        return None
    if kind not in KINDS:
        raise FormatError(f"response_format.type {kind!r} is not one of text, {', '.join(KINDS)}")
    if kind == "json_object":
        _keys(obj, {"type"}, "response_format")
        return OutputFormat.json_object()
    if kind == "json_schema":
        _keys(obj, {"type", "json_schema", "layout"}, "response_format")
        spec = obj.get("json_schema")
        if not isinstance(spec, dict):
            raise FormatError("response_format.json_schema must be an object with a 'schema' (and optional "
                              "'name', 'strict', 'description')")
        _keys(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        if "schema" not in spec:
            raise FormatError("response_format.json_schema.schema is missing; give the JSON Schema there")
        strict = spec.get("strict", False)
        if strict is None:
            strict = False
        if not isinstance(strict, bool):
            raise FormatError("response_format.json_schema.strict must be true or false")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise FormatError("response_format.json_schema.name must be a string")
        return OutputFormat.json_schema(spec["schema"], strict=strict, name=name, layout=obj.get("layout", "prefix"))
    _keys(obj, {"type", kind}, "response_format")
    if kind not in obj:
        raise FormatError(f"response_format.{kind} is missing (type {kind!r} takes its value there)")
    return getattr(OutputFormat, kind)(obj[kind])


def _lark_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def grammar_text(fmt: OutputFormat) -> str:
    """llguidance's grammar for a format (not yet checked: see state.compile_format)."""
    from llguidance import LLMatcher

    if fmt.is_json:
        options = dict(JSON_OPTIONS, lenient=not fmt.strict)
        try:
            return LLMatcher.grammar_from_json_schema(fmt.value, overrides=options)
        except (ValueError, TypeError) as e:
            raise FormatError(f"response_format.json_schema.schema is not usable: {e}") from None
    if fmt.kind == "regex":
        return LLMatcher.grammar_from_regex(fmt.value)
    if fmt.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in fmt.value))
    return LLMatcher.grammar_from_lark(fmt.value)
