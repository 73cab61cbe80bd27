"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) for chat requests.

A call is written as `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`, the format of the
Qwen / Dream chat templates, and the output is constrained by a grammar (unmask.structured) so that
every call names a declared function and its arguments are valid under that function's JSON schema:

    tool_choice "none"       no tools shown, no constraint
    tool_choice "auto"       free text (not starting with "<") or one or more calls
    tool_choice "required"   one or more calls (one with parallel_tool_calls false)
    {"type": "function", "function": {"name": N}}   calls of N only

How the tools reach the model: a family whose chat template renders `tools` (Qwen, SDAR, ...) gets
them as the template defines; our own template, and a family template that does not read `tools`,
have no tool syntax, so a system message lists them
(`TOOL_PREAMBLE`, each function as one JSON line) and says how to call; tool results (`role: "tool"`)
come back as user turns wrapped in `<tool_response>` ... `</tool_response>`, and an assistant turn that
called tools is shown as the calls it wrote.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import UserError
from ..structured.formats import JSON_OPTIONS, OutputFormat

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_PREAMBLE = ("You can call functions. To call one, write <tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call> "
                 "and nothing else. The functions:\n")
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict, ...]  # OpenAI's {"name", "description", "parameters"} per function
    choice: str  # "auto", "required" or a function name
    parallel: bool = True


def parse_tools(tools, tool_choice="auto", parallel_tool_calls=None) -> Tools | None:
    """OpenAI's fields -> Tools (None: no tools, or tool_choice "none"). UserError names the field."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise UserError("tool_choice needs tools; declare the functions in 'tools'")
        return None
    fns = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise UserError(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name or ""):
            raise UserError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise UserError(f"{where}.function.parameters must be a JSON Schema of type object")
        fns.append({"name": name, "description": f.get("description", ""), "parameters": params,
                    "strict": bool(f.get("strict"))})
    if len({f["name"] for f in fns}) != len(fns):
        raise UserError("tools: two functions have the same name")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in {f["name"] for f in fns}:
            raise UserError(f"tool_choice names the function {name!r}, which is not in tools "
                            f"({', '.join(f['name'] for f in fns)})")
        choice = name
    elif choice not in ("auto", "required"):
        raise UserError(f"tool_choice {choice!r}: use 'none', 'auto', 'required' or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    return Tools(tuple(fns), choice, True if parallel_tool_calls is None else bool(parallel_tool_calls))


def _literal(tokenizer, text: str) -> str:
    """A Lark literal for `text`; a tokenizer with `text` as one added token (Qwen's `<tool_call>`)
    gets that token, the one its model writes."""
    try:
        return f"<[{tokenizer.id_of(text)}]>"
    except (KeyError, AttributeError):
        return json.dumps(text)


def output_format(tools: Tools, tokenizer=None) -> OutputFormat:
    """The grammar of the reply (see the module docstring)."""
    fns = [f for f in tools.functions if tools.choice in ("auto", "required") or f["name"] == tools.choice]
    one = {"oneOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                      "required": ["name", "arguments"], "additionalProperties": False} for f in fns],
           "x-guidance": dict(JSON_OPTIONS, lenient=not all(f["strict"] for f in fns))}
    calls = "call+" if tools.parallel else "call"
    start = f"TEXT | {calls}" if tools.choice == "auto" else calls
    lark = (f"start: {start}\ncall: {_literal(tokenizer, OPEN)} json {_literal(tokenizer, CLOSE)}\n"
            f"json: %json {json.dumps(one)}\n"
            "TEXT: /[^<](.|\\n)*/\n")
    return OutputFormat("grammar", lark, name="tools")


def chat_for_model(model, messages: list[dict], tools: Tools | None) -> tuple[list[dict], dict]:
    """(messages, template kwargs) for the model's chat template: tools passed to a template that
    renders them, or described in a system message for ours; tool turns rewritten for ours."""
    template = getattr(model.tokenizer, "chat_template", None)
    if template is not None and (tools is None or template.uses("tools")):
        kwargs = {"tools": [{"type": "function", "function": {k: f[k] for k in ("name", "description", "parameters")}}
                            for f in tools.functions]} if tools else {}
        return [_hf_message(m) for m in messages], kwargs
    out = [_our_message(m) for m in messages]
    if tools:
        listing = TOOL_PREAMBLE + "".join(json.dumps({k: f[k] for k in ("name", "description", "parameters")},
                                                     ensure_ascii=False) + "\n" for f in tools.functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": listing + "\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": listing.rstrip("\n")})
    return out, {}


def _calls_text(calls) -> str:
    parts = []
    for c in calls or ():
        fn = c.get("function", {})
        args = _arguments(fn)
        parts.append(OPEN + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + CLOSE)
    return "".join(parts)


def _our_message(m: dict) -> dict:
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    if m["role"] == "assistant" and m.get("tool_calls"):
        return {"role": "assistant", "content": (m.get("content") or "") + _calls_text(m["tool_calls"])}
    return {"role": m["role"], "content": m.get("content") or ""}


def _arguments(fn: dict):
    args = fn.get("arguments") or "{}"
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise UserError(f"messages: tool call {fn.get('name')!r} has arguments that are not JSON") from None


def _hf_message(m: dict) -> dict:
    out = {k: v for k, v in m.items() if v is not None}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
            "name": c["function"]["name"], "arguments": _arguments(c["function"])}} for c in m["tool_calls"]]
    return out


def split_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: the calls in OpenAI's shape (arguments as a JSON string).
    Only a reply that starts with a call is calls (the grammar makes it calls only); plain text that
    happens to hold `<tool_call>` later is text, and is never run as a call."""
    if not text.startswith(OPEN):
        return text, []
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except ValueError:
            continue  # not produced under the grammar (it cannot happen there); left in the text
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj.get("name"), "arguments": json.dumps(obj.get("arguments", {}),
                                                                                    ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return (rest or None), calls
