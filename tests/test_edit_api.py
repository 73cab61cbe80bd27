"""Mercury's next-edit API: the tagged prompt read into an infilling task, `/v1/edit/completions`
with Inception's own client, its 400s, and edit examples in `unmask finetune` data."""
from __future__ import annotations

import httpx
import pytest
from inceptionai import Inception

from conftest import random_pretrained
from test_server_support import live
from unmask.errors import UserError
from unmask.frontend.edit import edit_task, parse_edit
from unmask.train.sft_data import encode_example

pytestmark = pytest.mark.timeout(180)
EXAMPLE = ("<|recently_viewed_code_snippets|>\n<|recently_viewed_code_snippet|>\ncode_snippet_file_path: ops.py\n"
           "def sub(a, b):\n    return a - b\n<|/recently_viewed_code_snippet|>\n<|/recently_viewed_code_snippets|>\n"
           "<|current_file_content|>\ncurrent_file_path: add.py\nimport math\n<|code_to_edit|>\ndef add(a, b):\n"
           "    return a - b<|cursor|>\n<|/code_to_edit|>\nprint(add(1, 2))\n<|/current_file_content|>\n"
           "<|edit_diff_history|>\n# Implement addition rather than subtraction.\n<|/edit_diff_history|>")


def test_sections_are_read_and_laid_out_as_infilling():
    e = parse_edit(EXAMPLE)
    assert (e.path, e.before, e.region, e.after) == ("add.py", "import math\n", "def add(a, b):\n    return a - b",
                                                    "print(add(1, 2))")
    assert e.cursor == len("def add(a, b):\n    return a - b") and e.snippets == (("ops.py", "def sub(a, b):\n"
                                                                                    "    return a - b"),)
    prefix, suffix = edit_task(e)
    assert prefix == ("# file: ops.py\ndef sub(a, b):\n    return a - b\n\n# recent edits:\n"
                      "# # Implement addition rather than subtraction.\n\n# file: add.py\nimport math\n")
    assert suffix == "\nprint(add(1, 2))"
    # the file is before + region + suffix, as the editor has it (cursor removed)
    assert e.before + e.region + suffix == "import math\ndef add(a, b):\n    return a - b\nprint(add(1, 2))"


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("<|code_to_edit|>x<|/code_to_edit|>", "current_file_content"),
    ("<|current_file_content|>\ncurrent_file_path: a.py\nx = 1\n<|/current_file_content|>", "one <\\|code_to_edit"),
    ("<|current_file_content|>\nx = 1\n<|code_to_edit|>\ny\n<|/code_to_edit|>\n<|/current_file_content|>",
     "current_file_path"),
    (EXAMPLE.replace("<|/edit_diff_history|>", ""), "edit_diff_history"),
    (EXAMPLE.replace("<|cursor|>", "<|cursor|><|cursor|>"), "more than once"),
])
def test_malformed_edit_prompts_are_one_line_errors(content, match):
    with pytest.raises(UserError, match=match) as e:
        parse_edit(content)
    assert str(e.value).startswith("messages[0].content") and "\n" not in str(e.value)


def test_edit_endpoint_with_inceptions_client(tok):
    with live(random_pretrained(tok, "block", max_seq_len=256)) as srv:
        client = Inception(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        r = client.edit.completions.create(model=model, messages=[{"role": "user", "content": EXAMPLE}],
                                           max_tokens=24, temperature=0.0, top_p=1.0, presence_penalty=0.0)
        assert r.object == "edit.completion" and r.id.startswith("edit-")
        assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
        bad = httpx.post(srv.url + "/v1/edit/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "no sections"}], "max_tokens": 8})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        two = httpx.post(srv.url + "/v1/edit/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": EXAMPLE}] * 2})
        assert two.status_code == 400


def test_finetune_takes_edit_examples_laid_out_like_the_server(tok):
    model = random_pretrained(tok, "block", max_seq_len=256)
    rec = {"messages": [{"role": "user", "content": EXAMPLE}, {"role": "assistant", "content":
                                                                 "def add(a, b):\n    return a + b"}]}
    head, answer = encode_example(model, rec, "f.jsonl:1")
    fim = encode_example(model, {"prefix": edit_task(parse_edit(EXAMPLE))[0], "suffix": "\nprint(add(1, 2))",
                                 "middle": "def add(a, b):\n    return a + b"}, "f.jsonl:2")
    assert (head, answer) == fim
    bad = {"messages": [{"role": "user", "content": EXAMPLE.replace("current_file_path", "path")},
                        {"role": "assistant", "content": "x"}]}
    with pytest.raises(UserError, match="f.jsonl:3: messages\\[0\\].content"):
        encode_example(model, bad, "f.jsonl:3")


def test_region_closed_before_opened_and_no_code_after():
    bad = "<|current_file_content|>\ncurrent_file_path: a.py\n<|/code_to_edit|>x<|code_to_edit|>\n<|/current_file_content|>"
    with pytest.raises(UserError, match="comes before"):
        parse_edit(bad)
    last = parse_edit("<|current_file_content|>\ncurrent_file_path: a.py\nx = 1\n<|code_to_edit|>\ny = 2\n"
                      "<|/code_to_edit|>\n<|/current_file_content|>")
    assert edit_task(last) == ("# file: a.py\nx = 1\n", None)
