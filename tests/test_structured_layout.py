"""A json_schema of fixed shape laid out by its keys (structured/layout.py): the template it becomes,
its refusals, and valid outputs on one canvas (full attention: every value under its own grammar in
the same steps) and as a chain (block models), batched with unconstrained requests unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.structured import FormatError, OutputFormat, parse_response_format
from unmask.structured.layout import fixed_shape, schema_template
from unmask.structured.suite import CASES, check, run_suite

pytestmark = pytest.mark.timeout(300)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "home"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                         "home": {"type": "object", "additionalProperties": False, "required": ["zip"],
                                  "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
FIXED = [c for c in CASES if c.schema is not None and fixed_shape(c.schema)]
SUBSET = [c for c in FIXED if c.name in ("person", "nested", "pattern_id", "int_range", "null_union", "ref", "commit")]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine."""


def test_template_of_a_schema():
    segments, formats = schema_template(OutputFormat.json_schema(PERSON, layout="keys"))
    assert segments == ['{"name":', None, ',"age":', None, ',"home":{"zip":', None, "}}"]
    assert [f.value["type"] for f in formats] == ["string", "integer", "string"]
    assert formats[2].value["pattern"] == "^[0-9]{5}$"
    assert len(FIXED) >= 25  # the validity suite's schemas of fixed shape


def test_refusals():
    optional = {**PERSON, "required": ["name"]}
    with pytest.raises(FormatError, match="response_format.layout 'keys' needs a schema of fixed shape"):
        schema_template(OutputFormat.json_schema(optional, layout="keys"))
    with pytest.raises(FormatError, match="response_format.layout 'rows'"):
        parse_response_format({"type": "json_schema", "json_schema": {"schema": PERSON}, "layout": "rows"})
    with pytest.raises(FormatError, match="unknown field 'layout'"):
        parse_response_format({"type": "json_object", "layout": "keys"})
    m = random_pretrained(__import__("unmask").tokenizer.train_tokenizer(["abc {} 0123"] * 5, vocab_size=300),
                          "full", max_seq_len=128)
    with pytest.raises(FormatError, match="max_tokens is 8 but the schema laid out by its keys needs at least"):
        Engine(m).add_request("p", SamplingParams(max_tokens=8, response_format=OutputFormat.json_schema(
            PERSON, layout="keys")))


@pytest.mark.parametrize("attention", ["full", "block"])
def test_valid_and_neighbours_untouched(tok, attention):
    m = random_pretrained(tok, attention, max_seq_len=256)
    r = run_suite(m, selected=SUBSET, layout="keys", max_tokens=96, mix_unconstrained=True)
    assert r["valid"] == r["n"], [(x["name"], x["problem"], x["text"]) for x in r["rows"] if x["problem"]]
    alone = Engine(m, max_batch=16).generate([c.prompt for c in SUBSET], SamplingParams(max_tokens=96))
    assert r["unconstrained"] == [o.text for o in alone]


def test_one_canvas_decodes_values_in_parallel(tok):
    """Full attention: a step commits tokens in several values (holes) at once."""
    m = random_pretrained(tok, "full", max_seq_len=256)
    eng = Engine(m)
    fmt = OutputFormat.json_schema(PERSON, layout="keys")
    holes_per_step = []
    for ev in eng.stream("p = ", SamplingParams(max_tokens=48, response_format=fmt, stream_canvas=True, block_size=64)):
        holes_per_step.append(len({next(k for k, (a, b) in enumerate(ev.holes) if a <= p < b) for p in ev.committed
                                   if any(a <= p < b for a, b in ev.holes)}))
        out = ev.output
    value = json.loads(out.text)
    jsonschema.validate(value, PERSON)
    assert max(holes_per_step) >= 2


def test_batched_equals_alone(tok):
    m = random_pretrained(tok, "full", max_seq_len=256)
    params = SamplingParams(max_tokens=96, response_format={**SUBSET[0].response_format, "layout": "keys"})
    alone = Engine(m).generate([SUBSET[0].prompt], params)[0].text
    outs = Engine(m, max_batch=4).generate([SUBSET[0].prompt, "x = 1\n", SUBSET[0].prompt],
                                           [params, SamplingParams(max_tokens=16), params])
    assert outs[0].text == outs[2].text == alone and check(SUBSET[0], alone) is None


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/fixtures/families (CI has it)")
def test_fixture_llada():
    import unmask

    m = unmask.load(SHARED / "llada-tiny")
    r = run_suite(m, selected=SUBSET, layout="keys", max_tokens=96)
    assert r["valid"] == r["n"], [(x["name"], x["problem"]) for x in r["rows"] if x["problem"]]


def test_http_chat(tok):
    import httpx

    from test_server_support import live

    m = random_pretrained(tok, "full", max_seq_len=256)
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}, "layout": "keys"}
    with live(m) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "a person"}], "max_tokens": 64, "response_format": rf},
            timeout=60)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
        bad = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "p", "response_format": {
            **rf, "json_schema": {"schema": {**PERSON, "required": []}}}}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.layout"
