"""Chat templates of Hugging Face tokenizers, rendered the way `transformers` renders them.

A checkpoint's chat template is a Jinja2 program that turns a list of messages into the prompt text
the model was trained on. It comes from the checkpoint directory (see `find_chat_template`), so it
is executed in Jinja2's immutable sandbox, with the same environment `transformers` gives it:

- `trim_blocks` and `lstrip_blocks` on, the trailing newline of the template dropped (Jinja2's
  default), the `loopcontrols` extension (`{% break %}`, `{% continue %}`) and a `{% generation %}`
  block tag that renders its body unchanged (transformers uses it to find assistant tokens);
- `raise_exception(message)`: the template refuses the messages; a one-line `UserError` with the
  template's message;
- the `tojson` filter as `json.dumps` with `ensure_ascii=False` and optional `indent`,
  `separators` and `sort_keys` (Jinja2's own `tojson` escapes HTML characters);
- `strftime_now(format)`: the local time, formatted;
- the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's named
  special tokens as strings (`bos_token`, `eos_token`, `pad_token`, `unk_token`, ..., only those
  that are set), and any extra keyword a caller passes (`enable_thinking`, ...), which win.

Messages are copied to plain JSON data first, keys whose value is None are dropped (many templates
handle a missing key but print "None" for a null one), and an assistant message's `thinking` or
`reasoning` is also offered as `reasoning_content`, as transformers does.

Beyond transformers' sandbox, reading an unsafe attribute (`''.__class__`, `x.__globals__`, a
mutating method) raises instead of rendering as an empty string, so a template cannot probe Python
internals silently. Rendering cost is not limited: templates are trusted as much as the checkpoint
that ships them, while messages are only data to them.

User text must not become control tokens: see `mark_control_tokens` and `HFTokenizer.encode_chat`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
CONFIG_FILE = "tokenizer_config.json"

# Wrapped around each control token found in user-supplied strings before rendering, so that the
# encoder can tell them from the control tokens the template writes itself. Two private-use code
# points of plane 16; any already in user text are removed first, so they cannot be forged.
MARK_START = "\U0010fffc"
MARK_END = "\U0010fffd"

_REASONING_KEYS = ("thinking", "reasoning")


class _TemplateRaised(Exception):
    """`raise_exception(...)` was called by the template."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, where an unsafe attribute raises at once instead of being undefined."""

    def unsafe_undefined(self, obj: Any, attribute: Any):  # type: ignore[override]
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed"
        )


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ChatTemplate:
    """One chat template and where it came from (`origin`, a file path for error messages)."""

    def __init__(self, source: str, origin: str):
        self.source = source
        self.origin = origin
        self._compiled = None

    def _template(self):
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.source)
            except TemplateSyntaxError as e:
                raise UserError(
                    f"{self.origin}: the chat template is not valid Jinja ({_one_line(e.message or e)}, "
                    f"line {e.lineno}); fix the template or copy the checkpoint's own"
                ) from None
        return self._compiled

    def uses(self, name: str) -> bool:
        """Whether the template reads the variable `name` (e.g. `tools`)."""
        from jinja2 import meta
        try:
            return name in meta.find_undeclared_variables(_environment().parse(self.source))
        except TemplateSyntaxError:
            return False

    def literals(self) -> list[str]:
        """Every string the template writes literally: its raw text and its string constants.
        Empty when it does not parse (rendering then reports why)."""
        try:
            ast = _environment().parse(self.source)
        except TemplateSyntaxError:
            return []
        out = [n.data for n in ast.find_all(nodes.TemplateData)]
        out += [n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)]
        return out

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list | None = None, documents: list | None = None, **variables: Any) -> str:
        """The prompt text. `messages` must come from `prepare_messages`; `variables` are the
        special-token strings and the caller's extra keywords (the latter win)."""
        template = self._template()
        try:
            return template.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except _TemplateRaised as e:
            raise UserError(f"{self.origin}: the chat template rejected the messages: "
                            f"{_one_line(e)}") from None
        except SecurityError as e:
            raise UserError(f"{self.origin}: the chat template tried something the sandbox forbids "
                            f"({_one_line(e)}); this template cannot be used") from None
        except Exception as e:  # any other failure inside the template program (TemplateError, ...)
            raise UserError(
                f"{self.origin}: the chat template failed on these messages "
                f"({type(e).__name__}: {_one_line(e)}); check the messages' roles and fields"
            ) from None

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, {len(self.source)} chars)"


def find_chat_template(directory: str | Path, tokenizer_config: Mapping[str, Any] | None
                       ) -> ChatTemplate | None:
    """The directory's chat template, or None when it has none.

    Looked up as recent transformers does: `chat_template.jinja` first, then `chat_template.json`
    (`{"chat_template": "..."}`), then the `chat_template` key of `tokenizer_config.json`, which is
    either a string or a list of `{"name", "template"}` (the one named "default" is used)."""
    directory = Path(directory)
    path = directory / TEMPLATE_FILE
    if path.is_file():
        return ChatTemplate(_read_text(path), str(path))
    path = directory / TEMPLATE_JSON_FILE
    if path.is_file():
        try:
            value = json.loads(_read_text(path)).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if not isinstance(value, str):
            raise UserError(f"{path}: expected a JSON object with a string 'chat_template'; "
                            "the file is corrupt, re-copy it from the checkpoint")
        return ChatTemplate(value, str(path))
    value = (tokenizer_config or {}).get("chat_template")
    origin = str(directory / CONFIG_FILE)
    if value is None:
        return None
    if isinstance(value, str):
        return ChatTemplate(value, origin)
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return ChatTemplate(named["default"], origin + " (chat_template 'default')")
        raise UserError(f"{origin}: chat_template is a list without a 'default' template (it has "
                        f"{sorted(str(n) for n in named)}); add one named 'default'")
    raise UserError(f"{origin}: chat_template must be a string or a list of {{name, template}}, "
                    f"not {type(value).__name__}; the file is corrupt, re-copy it")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the chat template ({_one_line(e)})") from None


def plain_data(value: Any, where: str) -> Any:
    """A copy of `value` made of JSON types only (dict, list, str, int, float, bool, None), so the
    template sees no object with methods of its own. Tuples become lists; pydantic models are
    dumped; anything else is a UserError naming `where`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) are cut back to the base type, losing their methods.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain_data(dump(), where)
    raise UserError(f"{where}: {type(value).__name__} values are not JSON data; pass strings, "
                    "numbers, booleans, lists and objects only")


def prepare_messages(messages: Any) -> list[dict]:
    """Validated plain copies of chat messages, as the template will see them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UserError(f"messages[{i}]: expected an object with 'role' and 'content'")
        m = plain_data(m, f"messages[{i}]")
        if not isinstance(m.get("role"), str):
            raise UserError(f"messages[{i}].role: expected a string, got "
                            f"{type(m.get('role')).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        if "reasoning_content" not in m:
            reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
            if reasoning is not None:
                m["reasoning_content"] = reasoning
        out.append(m)
    return out


def control_pattern(tokens: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `tokens`, longer ones first (so a token wins over one it contains);
    None for no tokens."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def has_control(obj: Any, pattern: re.Pattern | None) -> bool:
    """Whether any string in `obj` (nested lists and dict values) holds a control token."""
    if pattern is None:
        return False
    if isinstance(obj, str):
        return pattern.search(obj) is not None
    if isinstance(obj, Mapping):
        return any(has_control(v, pattern) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_control(v, pattern) for v in obj)
    return False


def mark_control_tokens(obj: Any, pattern: re.Pattern) -> Any:
    """A copy of `obj` where each control token in a string (nested lists and dict values; keys are
    left alone) is wrapped as MARK_START + token + MARK_END, after removing any marker characters
    the strings already held. Wrapping keeps the token's text, so a template that tests or splits
    on it (`'</think>' in content`, `content.split('</think>')`) behaves as it would unmarked."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, Mapping):
        return {k: mark_control_tokens(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(v, pattern) for v in obj]
    return obj
