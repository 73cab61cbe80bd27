"""The structured-output validity suite: 50 JSON schemas and 12 regexes / choices / grammars, each
with a prompt, and a runner that decodes them (optionally mixed with unconstrained requests) and
checks every output: it parses, it validates against its schema (jsonschema) or fully matches its
regex, and it finished with "stop", not a cut-off "length".

    from unmask.structured.suite import CASES, run_suite
    report = run_suite(model, max_tokens=256)      # report["valid"] == report["n"] is the goal

Used by tests/test_structured.py (a subset, small budgets) and `bench/structured.py` (all of it,
with TPF and tok/s against unconstrained decoding of the same prompts).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required=None, extra=False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


def arr(items: dict, lo=None, hi=None) -> dict:
    out = {"type": "array", "items": items}
    if lo is not None:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return out


SCHEMAS: list[tuple[str, str, dict]] = [
    ("person", "# a person record as JSON\nperson = ", obj({"name": S, "age": I})),
    ("point", "# a 2D point\npoint = ", obj({"x": N, "y": N})),
    ("flag", "# feature flag\nflag = ", obj({"name": S, "enabled": B})),
    ("tags", "# a list of tags\ntags = ", arr(S)),
    ("ints", "# some numbers\nnumbers = ", arr(I, 1, 8)),
    ("config", "# server config\nconfig = ", obj({"host": S, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                                "debug": B})),
    ("enum_color", "# the colour\ncolor = ", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("enum_obj", "# a log entry\nentry = ", obj({"level": {"enum": ["debug", "info", "warning", "error"]}, "msg": S})),
    ("const", "# a versioned record\nrecord = ", obj({"version": {"const": 2}, "id": I})),
    ("optional", "# a user with an optional email\nuser = ", obj({"name": S, "email": S, "age": I}, required=["name"])),
    ("all_optional", "# options\nopts = ", obj({"verbose": B, "retries": I, "label": S}, required=[])),
    ("nested", "# an order\norder = ", obj({"id": I, "customer": obj({"name": S, "city": S}),
                                           "items": arr(obj({"sku": S, "qty": I}), 1, 4)})),
    ("deep", "# a tree node\nnode = ", obj({"a": obj({"b": obj({"c": obj({"d": I})})})})),
    ("matrix", "# a 2x2 matrix\nm = ", arr(arr(N, 2, 2), 2, 2)),
    ("pattern_id", "# a ticket\nticket = ", obj({"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "title": S})),
    ("pattern_date", "# an event\nevent = ", obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                                  "name": S})),
    ("len_str", "# a short code\ncode = ", obj({"code": {"type": "string", "minLength": 3, "maxLength": 6}})),
    ("num_range", "# a probability\np = ", obj({"p": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("int_range", "# a dice roll\nroll = ", obj({"value": {"type": "integer", "minimum": 1, "maximum": 6}})),
    ("neg_int", "# a temperature reading\nreading = ", obj({"celsius": {"type": "integer", "minimum": -50, "maximum": 50}})),
    ("null_union", "# a parent link\nlink = ", obj({"parent": {"type": ["integer", "null"]}, "name": S})),
    ("anyof", "# a value\nvalue = ", obj({"v": {"anyOf": [I, S, B]}})),
    ("oneof_shape", "# a shape\nshape = ", {"oneOf": [obj({"kind": {"const": "circle"}, "r": N}),
                                                       obj({"kind": {"const": "square"}, "side": N})]}),
    ("array_objs", "# users\nusers = ", arr(obj({"id": I, "name": S}), 1, 3)),
    ("bool_list", "# switches\nswitches = ", arr(B, 2, 5)),
    ("string_map", "# environment variables\nenv = ", {"type": "object", "additionalProperties": S}),
    ("int_map", "# word counts\ncounts = ", {"type": "object", "additionalProperties": I, "maxProperties": 4}),
    ("ref", "# a linked pair\npair = ", {"$defs": {"item": obj({"id": I, "label": S})},
                                         "type": "object", "properties": {"left": {"$ref": "#/$defs/item"},
                                                                          "right": {"$ref": "#/$defs/item"}},
                                         "required": ["left", "right"], "additionalProperties": False}),
    ("recursive", "# a small tree\ntree = ", {"$defs": {"n": {"type": "object", "properties": {
        "v": I, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/n"}),
    ("package", "# package.json\npkg = ", obj({"name": S, "version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"},
                                               "dependencies": {"type": "object", "additionalProperties": S,
                                                                "maxProperties": 3}})),
    ("http", "# an HTTP response\nresp = ", obj({"status": {"type": "integer", "minimum": 100, "maximum": 599},
                                                  "headers": {"type": "object", "additionalProperties": S,
                                                              "maxProperties": 3}, "body": S})),
    ("geo", "# a place\nplace = ", obj({"name": S, "lat": {"type": "number", "minimum": -90, "maximum": 90},
                                        "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    ("money", "# a price\nprice = ", obj({"amount": N, "currency": {"enum": ["USD", "EUR", "GBP"]}})),
    ("rgb", "# a colour\nrgb = ", arr({"type": "integer", "minimum": 0, "maximum": 255}, 3, 3)),
    ("tuple", "# a pair\npair = ", {"type": "array", "prefixItems": [S, I], "items": False, "minItems": 2}),
    ("function_call", "# a tool call\ncall = ", obj({"name": {"enum": ["get_weather", "get_time"]},
                                                     "arguments": obj({"city": S})})),
    ("test_case", "# a unit test case\ncase = ", obj({"input": arr(I, 0, 4), "expected": I, "description": S})),
    ("schema_like", "# a column\ncolumn = ", obj({"name": S, "type": {"enum": ["int", "str", "float"]}, "nullable": B})),
    ("empty_obj", "# nothing\nnothing = ", obj({})),
    ("str_only", "# a greeting\ngreeting = ", S),
    ("int_only", "# the answer\nanswer = ", I),
    ("bool_only", "# is it done\ndone = ", B),
    ("num_only", "# pi\npi = ", N),
    ("null_only", "# nothing\nx = ", {"type": "null"}),
    ("email_pat", "# a contact\ncontact = ", obj({"email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"}})),
    ("uuid_like", "# an id\nrec = ", obj({"id": {"type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}$"}})),
    ("many_fields", "# a record with many fields\nrow = ", obj({k: I for k in "abcdefgh"})),
    ("list_of_lists", "# a grid\ngrid = ", arr(arr(I, 1, 3), 1, 3)),
    ("mixed_array", "# mixed values\nvals = ", arr({"type": ["integer", "string", "boolean"]}, 1, 4)),
    ("commit", "# a git commit\ncommit = ", obj({"sha": {"type": "string", "pattern": "^[0-9a-f]{7}$"}, "message": S,
                                                 "files": arr(S, 1, 3)})),
]

OTHERS: list[tuple[str, str, dict]] = [
    ("re_phone", "# a phone number\nphone = ", {"type": "regex", "regex": r"\d{3}-\d{3}-\d{4}"}),
    ("re_ident", "# a Python identifier\nname = ", {"type": "regex", "regex": r"[a-z_][a-z0-9_]{0,15}"}),
    ("re_ipv4", "# an IP address\nip = ", {"type": "regex", "regex": r"(\d{1,3}\.){3}\d{1,3}"}),
    ("re_semver", "# a version\nversion = ", {"type": "regex", "regex": r"v?\d+\.\d+\.\d+"}),
    ("re_call", "# a call\n", {"type": "regex", "regex": r"print\([a-z]+\)"}),
    ("re_hex", "# a colour\ncolor = ", {"type": "regex", "regex": r"#[0-9a-fA-F]{6}"}),
    ("re_words", "# three words\nwords = ", {"type": "regex", "regex": r"[a-z]+( [a-z]+){2}"}),
    ("re_def", "# a function header\n", {"type": "regex", "regex": r"def [a-z_]+\([a-z, ]*\):"}),
    ("choice_yn", "# is 7 prime? answer = ", {"type": "choice", "choice": ["yes", "no"]}),
    ("choice_lang", "# the language of this file\nlang = ", {"type": "choice", "choice": ["python", "javascript", "rust"]}),
    ("lark_sum", "# an arithmetic expression\nexpr = ", {"type": "grammar", "grammar":
        'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER\nNUMBER: /[0-9]{1,4}/'}),
    ("lark_list", "# a list literal\nxs = ", {"type": "grammar", "grammar":
        'start: "[" (NUM ("," NUM)*)? "]"\nNUM: /[0-9]{1,3}/'}),
]


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    response_format: dict
    schema: dict | None = None  # JSON cases: what jsonschema checks


def cases() -> list[Case]:
    out = [Case(n, p, {"type": "json_schema", "json_schema": {"name": n, "schema": s, "strict": True}}, s)
           for n, p, s in SCHEMAS]
    out += [Case(n, p, f) for n, p, f in OTHERS]
    return out


CASES = cases()


def _lark_check(case: Case, text: str) -> bool:
    """The two Lark cases, checked by the equivalent regex (we have no Lark parser at hand)."""
    pat = {"lark_sum": r"[0-9]{1,4}([+-][0-9]{1,4})*", "lark_list": r"\[([0-9]{1,3}(,[0-9]{1,3})*)?\]"}[case.name]
    return re.fullmatch(pat, text) is not None


def check(case: Case, text: str) -> str | None:
    """None if `text` is a valid output of the case, else why not."""
    import jsonschema

    fmt = case.response_format
    if case.schema is not None:
        try:
            value = json.loads(text)
        except ValueError as e:
            return f"not JSON ({e})"
        try:
            jsonschema.validate(value, case.schema)
        except jsonschema.ValidationError as e:
            return f"schema: {e.message}"
        return None
    if fmt["type"] == "regex":
        return None if re.fullmatch(fmt["regex"], text) else "does not match the regex"
    if fmt["type"] == "choice":
        return None if text in fmt["choice"] else "not one of the choices"
    return None if _lark_check(case, text) else "does not match the grammar"


def run_suite(model, *, engine=None, max_tokens: int = 256, selected: list[Case] | None = None,
              constrained: bool = True, mix_unconstrained: bool = False, seed: int | None = None,
              temperature: float | None = None, layout: str = "prefix") -> dict:
    """Decode every case together (one batch) and check them. constrained=False decodes the same
    prompts without their formats (the speed baseline; nothing is checked). mix_unconstrained adds
    each prompt once more without a format, to the same batch. layout="keys": the JSON schemas of
    fixed shape are laid out by their keys (structured/layout.py); the other cases as they are."""
    from ..engine import Engine, SamplingParams
    from .layout import fixed_shape

    sel = list(selected) if selected is not None else CASES
    eng = engine or Engine(model, max_batch=16)

    def fmt(c: Case):
        if not constrained:
            return None
        if layout == "keys" and c.schema is not None and fixed_shape(c.schema):
            return {**c.response_format, "layout": "keys"}
        return c.response_format

    params = [SamplingParams(max_tokens=max_tokens, response_format=fmt(c), seed=seed, temperature=temperature)
              for c in sel]
    prompts = [c.prompt for c in sel]
    if mix_unconstrained:
        params += [SamplingParams(max_tokens=max_tokens, seed=seed, temperature=temperature) for _ in sel]
        prompts += prompts[: len(sel)]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t0
    rows = []
    for c, o in zip(sel, outs):
        why = check(c, o.text) if constrained else None
        if constrained and o.finish_reason != "stop":
            why = why or f"finished with {o.finish_reason!r}"
        rows.append({"name": c.name, "text": o.text, "finish_reason": o.finish_reason, "tokens": o.completion_tokens,
                     "nfe": o.nfe, "problem": why})
    toks = sum(o.completion_tokens for o in outs[: len(sel)])
    nfe = sum(o.nfe for o in outs[: len(sel)])
    return {"n": len(sel), "valid": sum(r["problem"] is None for r in rows), "rows": rows,
            "completion_tokens": toks, "nfe": nfe, "tokens_per_forward": toks / nfe if nfe else 0.0,
            "seconds": wall, "tokens_per_second": toks / wall if wall else 0.0,
            "unconstrained": [o.text for o in outs[len(sel):]] if mix_unconstrained else None}
