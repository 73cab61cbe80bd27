"""`unmask generate`'s structured-output options: one of --json-schema, --json-object, --regex,
--choice, --grammar (mutually exclusive)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .formats import OutputFormat


def add_arguments(parser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                   help="the output is JSON valid under this JSON Schema (a file, or the schema itself)")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", default=None, help="the output matches this regular expression in full")
    g.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    g.add_argument("--grammar", default=None, metavar="FILE", help="the output follows this Lark grammar")


def _text(value: str, what: str) -> str:
    p = Path(value)
    try:
        is_file = p.is_file()
    except OSError:  # e.g. an inline schema longer than a file name may be
        is_file = False
    if is_file:
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{value}: cannot read the {what} ({e})") from None
    return value


def from_args(a) -> OutputFormat | None:
    if a.json_schema is not None:
        text = _text(a.json_schema, "JSON Schema")
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise UserError(f"--json-schema: neither a readable file nor valid JSON ({e}); pass a schema file "
                            "or the schema as a JSON string") from None
        return OutputFormat.json_schema(schema)
    if a.json_object:
        return OutputFormat.json_object()
    if a.regex is not None:
        return OutputFormat.regex(a.regex)
    if a.choice is not None:
        return OutputFormat.choice(a.choice)
    if a.grammar is not None:
        if not Path(a.grammar).is_file():
            raise UserError(f"--grammar {a.grammar}: no such file; pass a file holding a Lark grammar")
        return OutputFormat.grammar(_text(a.grammar, "grammar"))
    return None
