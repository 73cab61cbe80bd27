"""response_format over HTTP with the official openai client (chat and completions, streamed and
not), Mercury's FIM endpoint, and bad formats answered 400 naming the field."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from conftest import random_pretrained
from test_server_support import live

pytestmark = pytest.mark.timeout(180)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"},
                                                                                "maxItems": 3}},
          "required": ["name", "tags"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def srv(tok):
    with live(random_pretrained(tok, "block", max_seq_len=256)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_json_schema(client):
    r = client.chat.completions.create(messages=[{"role": "user", "content": "a record"}],
                                       model=client.models.list().data[0].id, max_tokens=96,
                                       response_format=JSON_SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_completion_regex_and_json_object_streamed(client):
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="phone = ", max_tokens=32,
                                  extra_body={"response_format": {"type": "regex", "regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=model, prompt="obj = ", max_tokens=64, stream=True,
                                       extra_body={"response_format": {"type": "json_object"}})
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)


def test_mercury_fim_with_a_choice(srv):
    body = {"prompt": "def f(x):\n    return ", "suffix": "\n", "max_tokens": 8,
            "response_format": {"type": "choice", "choice": ["x + 1", "x * 2"]}}
    r = httpx.post(srv.url + "/v1/fim/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("x + 1", "x * 2")


@pytest.mark.parametrize("fmt, max_tokens, param", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, 32, "response_format.json_schema.schema"),
    ({"type": "yaml"}, 32, "response_format.type"),
    ({"type": "regex", "regex": "(ab"}, 32, "response_format.regex"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strictly": True}}, 32, "response_format.json_schema"),
    (JSON_SCHEMA, 4, "max_tokens"),
])
def test_bad_formats_are_400_naming_the_field(srv, fmt, max_tokens, param):
    for path, extra in (("/v1/completions", {"prompt": "x = "}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(srv.url + path, json={**extra, "max_tokens": max_tokens, "response_format": fmt}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
