"""Tool calls: OpenAI's tools / tool_choice / parallel_tool_calls through the engine and the server
(the official openai client, streamed and not), tool results accepted back, arguments valid under
each function's schema, a family template that renders tools, and the 400s."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import unmask
from conftest import random_pretrained
from test_server_support import live
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.frontend.tools import parse_tools, split_calls

pytestmark = pytest.mark.timeout(180)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"


def _valid_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        name = c["function"]["name"]
        assert name in (names or SCHEMAS)
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


@pytest.fixture(scope="module")
def model(tok):
    return random_pretrained(tok, "block", max_seq_len=1024)


@pytest.mark.parametrize("choice, names", [("required", None), ({"type": "function", "function": {"name": "add"}}, ["add"])])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_and_named_choices_give_valid_calls(model, choice, names, parallel):
    out = Engine(model, max_batch=2).generate([ASK], SamplingParams(max_tokens=160, tools=TOOLS, tool_choice=choice,
                                                                   parallel_tool_calls=parallel))[0]
    content, calls = split_calls(out.text)
    assert out.finish_reason == "stop" and content is None
    _valid_calls(calls, names)
    assert parallel or len(calls) == 1


def test_bad_tools_and_choices_are_one_line_errors():
    for tools, choice, match in [
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "auto", "parameters must"),
        ([{"type": "retrieval"}], "auto", r"tools\[0\]"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
        (TOOLS, "sometimes", "tool_choice 'sometimes'"),
        (TOOLS + TOOLS[:1], "auto", "same name"),
        (None, "required", "needs tools"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_tools(tools, choice)
    assert parse_tools(TOOLS, "none") is None


def test_server_tool_calls_streamed_and_not_and_results_back(model):
    with live(model) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=160)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        _valid_calls([c.model_dump() for c in msg.tool_calls])
        chunks = list(client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, max_tokens=160,
                                                     tool_choice={"type": "function", "function": {"name": "add"}},
                                                     stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        _valid_calls([{"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                                 "arguments": c.function.arguments}} for c in calls], ["add"])
        back = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
        r = client.chat.completions.create(model=name, messages=back, tools=TOOLS, tool_choice="none", max_tokens=8)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        for body, param in [({"messages": ASK, "tool_choice": {"type": "function", "function": {"name": "nope"}},
                              "tools": TOOLS}, None),
                            ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                            ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters":
                                                                                           {"type": "string"}}}]}, None)]:
            bad = httpx.post(srv.url + "/v1/chat/completions", json={**body, "max_tokens": 8}, timeout=60)
            assert bad.status_code == 400, bad.text
            if param:
                assert bad.json()["error"]["param"] == param


@pytest.mark.skipif(not (SHARED / "sdar-tiny").is_dir(), reason="needs ../shared/fixtures/families")
@pytest.mark.parametrize("family", ["sdar-tiny", "dream-tiny"])  # a template that renders tools; one that does not
def test_a_family_template_renders_the_tools(family):
    model = unmask.load(SHARED / family)
    from unmask.frontend.prompt import layout_prompt
    from unmask.frontend.tools import chat_for_model
    msgs, kwargs = chat_for_model(model, ASK, parse_tools(TOOLS, "auto"))
    text = model.tokenizer.decode(layout_prompt(model, msgs, None, kwargs)[0])
    plain = model.tokenizer.decode(layout_prompt(model, ASK)[0])
    assert "get_weather" in text and "get_weather" not in plain
    out = Engine(model).generate([ASK], SamplingParams(max_tokens=160, tools=TOOLS, tool_choice="required"))[0]
    _valid_calls(split_calls(out.text)[1])


def test_plain_text_holding_a_call_is_not_a_call():
    text = 'Sure. <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert split_calls(text) == (text, [])
