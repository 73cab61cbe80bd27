"""Structured outputs (unmask.structured): response_format parsing and its errors, the grammar stage
in the engine (valid, finished, parallel, batch-invariant, neighbours untouched, preemption), the
validity suite on random models of every attention kind, on the family fixtures and on the shipped
model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import unmask
from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.structured import FormatError, OutputFormat, parse_response_format
from unmask.structured.state import compile_format
from unmask.structured.suite import CASES, check, run_suite

pytestmark = pytest.mark.timeout(300)
BY_NAME = {c.name: c for c in CASES}
# A spread of the suite: nested objects, arrays, enums, numbers, patterns, optional fields, $ref,
# recursion, unions, maps, scalars, regexes, choices and both Lark grammars.
SUBSET = ["person", "nested", "matrix", "pattern_id", "optional", "ref", "recursive", "oneof_shape", "int_map",
          "int_only", "num_only", "commit", "re_phone", "re_words", "choice_lang", "lark_sum", "lark_list"]
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "unmask-coder"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine."""


@pytest.fixture(scope="module")
def block_model(tok):
    return random_pretrained(tok, "block", max_seq_len=192)


# ---- the request's side ------------------------------------------------------------------------
@pytest.mark.parametrize("obj, kind", [
    (None, None), ({"type": "text"}, None), ({"type": "json_object"}, "json_object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": True}}, "json_schema"),
    ({"type": "regex", "regex": "a+"}, "regex"), ({"type": "choice", "choice": ["a", "b"]}, "choice"),
    ({"type": "grammar", "grammar": 'start: "a"'}, "grammar"),
])
def test_response_format_shapes(obj, kind):
    fmt = parse_response_format(obj)
    assert (fmt.kind if fmt else None) == kind


@pytest.mark.parametrize("obj, field", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strictt": True}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "regex"}, "response_format.regex"),
    ({"type": "regex", "regex": ""}, "response_format.regex"),
    ({"type": "choice", "choice": []}, "response_format.choice"),
    ({"type": "choice", "choice": ["a", 3]}, "response_format.choice"),
    ({"type": "json_object", "schema": {}}, "response_format"),
    ("json", "response_format"),
])
def test_bad_response_formats_name_their_field(obj, field):
    with pytest.raises(FormatError) as e:
        parse_response_format(obj)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt, match", [
    (OutputFormat.regex("[a-z"), r"^response_format\.regex is not accepted.*unclosed"),
    (OutputFormat.regex(r"[^\s\S]"), r"^response_format\.regex matches no string"),
    (OutputFormat.json_schema({"type": "strin"}, strict=True), r"^response_format\.json_schema\.schema is not accepted.*strin"),
    (OutputFormat.json_schema({"type": "string", "format": "ipv9"}, strict=True), r"^response_format\.json_schema\.schema.*ipv9"),
    (OutputFormat.grammar("start: foo"), r"^response_format\.grammar is not accepted"),
    (OutputFormat.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 40}), r"^max_tokens is 16"),
])
def test_formats_the_compiler_or_the_budget_refuse(block_model, fmt, match):
    with pytest.raises(FormatError, match=match):
        compile_format(block_model, fmt, 16)


def test_lenient_schema_ignores_unknown_keywords(block_model):
    schema = {"type": "string", "format": "ipv9"}
    compile_format(block_model, OutputFormat.json_schema(schema, strict=False), 16)


def test_engine_refuses_a_bad_format_and_keeps_serving(block_model):
    eng = Engine(block_model, max_batch=4)
    with pytest.raises(UserError, match="response_format.regex"):
        eng.add_request("x = ", SamplingParams(max_tokens=8, response_format={"type": "regex", "regex": "("}))
    out = eng.generate(["x = "], SamplingParams(max_tokens=8, response_format={"type": "regex", "regex": "[0-9]+"}))
    assert out[0].finish_reason == "stop" and out[0].text.isdigit()


# ---- the engine's side ---------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_suite_subset_is_valid_and_finished_on_random_models(tok, attention):
    """Random weights ramble as much as a model can: every output still parses, validates and ends
    with stop inside max_tokens."""
    model = random_pretrained(tok, attention, max_seq_len=192)
    rep = run_suite(model, max_tokens=96, selected=[BY_NAME[n] for n in SUBSET])
    bad = [(r["name"], r["problem"], r["text"]) for r in rep["rows"] if r["problem"]]
    assert not bad
    assert all(r["finish_reason"] == "stop" for r in rep["rows"])


def test_constrained_rows_do_not_change_their_neighbours(block_model):
    prompts = ["def add(a, b):", "class Stack:", "x = "]
    plain = SamplingParams(max_tokens=24)
    alone = [o.text for o in Engine(block_model, max_batch=8).generate(prompts, plain)]
    fmt = [SamplingParams(max_tokens=96, response_format=c.response_format) for c in
           (BY_NAME["nested"], BY_NAME["re_words"], BY_NAME["matrix"])]
    mixed = Engine(block_model, max_batch=8).generate(prompts + prompts, [plain] * 3 + fmt)
    assert [o.text for o in mixed[:3]] == alone
    assert all(check(c, o.text) is None for c, o in zip((BY_NAME["nested"], BY_NAME["re_words"],
                                                           BY_NAME["matrix"]), mixed[3:]))


def test_constrained_batched_equals_alone(block_model):
    sel = [BY_NAME[n] for n in ("person", "commit", "re_ipv4", "lark_sum")]
    params = [SamplingParams(max_tokens=64, response_format=c.response_format) for c in sel]
    together = [o.text for o in Engine(block_model, max_batch=8).generate([c.prompt for c in sel], params)]
    alone = [Engine(block_model, max_batch=1).generate([c.prompt], p)[0].text for c, p in zip(sel, params)]
    assert together == alone


def test_sampling_is_valid_and_repeatable(block_model):
    sel = [BY_NAME[n] for n in ("nested", "re_semver", "choice_lang")]
    a = run_suite(block_model, max_tokens=80, selected=sel, seed=7, temperature=1.0)
    b = run_suite(block_model, max_tokens=80, selected=sel, seed=7, temperature=1.0)
    assert a["valid"] == len(sel) and [r["text"] for r in a["rows"]] == [r["text"] for r in b["rows"]]


def test_preempted_request_restarts_its_grammar(block_model):
    sel = [BY_NAME[n] for n in ("nested", "ref", "commit", "package")]
    params = [SamplingParams(max_tokens=80, response_format=c.response_format) for c in sel]
    roomy = Engine(block_model, max_batch=4).generate([c.prompt for c in sel], params)
    tight = Engine(block_model, max_batch=4, kv_budget_tokens=220)
    out = tight.generate([c.prompt for c in sel], params)
    assert sum(o.preemptions for o in out) > 0
    assert [o.text for o in out] == [o.text for o in roomy]


def test_shipped_model_keeps_committing_in_parallel():
    """On a trained model most proposals are valid, so steps still commit several tokens."""
    model = unmask.load(SHIPPED)
    sel = [BY_NAME[n] for n in ("person", "nested", "ref", "many_fields", "deep", "array_objs", "function_call",
                                "schema_like", "geo", "money")]
    rep = run_suite(model, max_tokens=128, selected=sel)
    assert rep["valid"] == len(sel), [r for r in rep["rows"] if r["problem"]]
    assert rep["tokens_per_forward"] > 1.3
    assert json.loads(rep["rows"][0]["text"])["name"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/fixtures/families")
@pytest.mark.parametrize("family", sorted(p.name for p in SHARED.iterdir() if (p / "config.json").exists())
                         if SHARED.is_dir() else [])
def test_family_fixtures_give_valid_outputs(family):
    model = unmask.load(SHARED / family)
    sel = [BY_NAME[n] for n in ("person", "matrix", "optional", "re_phone", "choice_lang")]
    rep = run_suite(model, max_tokens=48, selected=sel)
    assert rep["valid"] == len(sel), [(r["name"], r["problem"], r["text"]) for r in rep["rows"] if r["problem"]]


# ---- the command line ----------------------------------------------------------------------------
def test_generate_with_a_schema_file_and_one_line_errors(tmp_path):
    from test_cli import cli_here

    schema = tmp_path / "point.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                  "required": ["x", "y"], "additionalProperties": False}))
    r = cli_here("generate", "# a point\np = ", "--json-schema", str(schema), "--max-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(json.loads(out["text"])) == {"x", "y"} and out["finish_reason"] == "stop"
    r = cli_here("generate", "ok = ", "--choice", "yes", "--choice", "no", "--json")
    assert json.loads(r.stdout)["text"] in ("yes", "no")
    for args, msg in ((["--json-schema", "{bad"], "--json-schema: neither a readable file nor valid JSON"),
                      (["--regex", "(a"], "response_format.regex is not accepted"),
                      (["--grammar", str(tmp_path / "none.lark")], "no such file"),
                      (["--regex", "a", "--reference"], "drop --reference")):
        r = cli_here("generate", "x = ", *args)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
