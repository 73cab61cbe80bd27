"""Templates with holes (frontend/template.py): fixed spans never change, every hole keeps to its
budget, batched == alone at temperature 0, each kind of model sees what docs/templates.md says it
sees, holes end early at a stop token, and bad templates are one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import random_pretrained
from unmask import FilledHole, Hole
from unmask.engine import Engine, SamplingParams
from unmask.engine.request import Request
from unmask.errors import UserError
from unmask.frontend.params import resolve
from unmask.frontend.template import close_holes, from_marked, load_template, parse_template, template_mode

pytestmark = pytest.mark.timeout(300)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
T1 = ["def ", Hole(5), "(a, b):\n    return ", Hole(6), "\n\nclass Stack:\n"]
T2 = ["class ", Hole(3), ":\n    def push(self, x):\n        ", Hole(7)]
T3 = [Hole(4), " + b\n"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine."""


@pytest.fixture(scope="module", params=["full", "block", "causal"])
def model(request, tok):
    return random_pretrained(tok, request.param, max_seq_len=128, peak=2.0)


def fill(engine, template, prompt="x = 1\n", **kw):
    return engine.generate([prompt], SamplingParams(template=template, temperature=0, **kw))[0]


def check_shape(out, template, tok):
    """The text is the template with each hole replaced by its fill; each fill keeps to its budget."""
    holes = [s for s in template if isinstance(s, Hole)]
    assert len(out.holes) == len(holes)
    it = iter(out.holes)
    assert out.text == "".join(s if isinstance(s, str) else next(it).text for s in template)
    for h, budget in zip(out.holes, holes):
        assert isinstance(h, FilledHole)
        assert len(h.token_ids) <= budget.max_tokens
        assert h.finish_reason in ("stop", "length")
        assert h.finish_reason == "stop" or len(h.token_ids) == budget.max_tokens
        assert tok.eos_id not in h.token_ids
    assert out.token_ids == [t for h in out.holes for t in h.token_ids]
    assert out.finish_reason == ("length" if any(h.finish_reason == "length" for h in out.holes) else "stop")


# ---- parsing -----------------------------------------------------------------------------------
def test_parse_forms():
    assert parse_template(["a", {"hole": 3}, {"text": "b"}, "c"]) == ("a", Hole(3), "bc")
    assert parse_template([Hole(2), ""]) == (Hole(2),)
    assert from_marked("x = {{hole:4}}\ny = {{hole:2}}") == ["x = ", Hole(4), "\ny = ", Hole(2)]
    assert load_template('["a", {"hole": 2}]') == ["a", {"hole": 2}]
    assert load_template("a{{hole:3}}") == ["a", Hole(3)]


@pytest.mark.parametrize("template, says", [
    ("a {{hole:3}}", "non-empty list"), ([], "non-empty list"), (["just text"], "has no hole"),
    ([Hole(2), Hole(3)], "template[1]: two holes in a row"), ([{"hole": 0}], "template[0]: a hole's budget must be at least 1"),
    ([{"hole": "4"}], "must be an integer"), ([{"hole": True}], "must be an integer"),
    ([{"hole": 2, "x": 1}], "template[0]: each item is a text span"), ([3], "template[0]: each item"),
])
def test_parse_errors(template, says):
    with pytest.raises(UserError, match=says.replace("[", r"\[").replace("]", r"\]")):
        parse_template(template)


def test_bad_requests(tok):
    eng = Engine(random_pretrained(tok, "full", max_seq_len=64))
    for kw, says in [({"suffix": "x"}, "suffix does not combine"), ({"stop": ["\n"]}, "stop does not combine"),
                     ({"response_format": {"type": "json_object"}}, "response_format does not combine"),
                     ({"max_tokens": 5}, "max_tokens is 5 but the template's holes ask for 11"),
                     ({"template": ["a", Hole(70), "b"]}, "template: the prompt, the text spans and the holes' budgets need")]:
        params = {"template": T1, **kw}
        with pytest.raises(UserError, match=says):
            eng.add_request("x", SamplingParams(**params))
    with pytest.raises(UserError, match="prompt must be text with a template"):
        eng.add_request([{"role": "user", "content": "hi"}], SamplingParams(template=T1))
    assert not eng.has_work()  # nothing was queued


def test_bad_request_in_a_batch_leaves_the_others(tok):
    eng = Engine(random_pretrained(tok, "block", max_seq_len=128))
    alone = fill(eng, T1)
    good = eng.add_request("x = 1\n", SamplingParams(template=T1, temperature=0))
    with pytest.raises(UserError):
        eng.add_request("x = 1\n", SamplingParams(template=["a", Hole(200)], temperature=0))
    outs = {}
    while eng.has_work():
        for ev in eng.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
    assert outs[good].text == alone.text


# ---- the engine ----------------------------------------------------------------------------------
def test_fixed_spans_and_budgets(model, tok):
    eng = Engine(model)
    for t in (T1, T2, T3):
        check_shape(fill(eng, t), t, tok)


def test_batched_equals_alone(model, tok):
    eng = Engine(model, max_batch=8)
    alone = [fill(eng, t, p).text for t, p in [(T1, "x = 1\n"), (T2, "y = 2\n"), (T3, "a = ")]]
    plain = eng.generate(["def add(a, b):\n"], SamplingParams(max_tokens=12, temperature=0))[0].text
    prompts = ["x = 1\n", "def add(a, b):\n", "y = 2\n", "a = "]
    params = [SamplingParams(template=T1, temperature=0), SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(template=T2, temperature=0), SamplingParams(template=T3, temperature=0)]
    outs = eng.generate(prompts, params)
    assert [outs[0].text, outs[2].text, outs[3].text] == alone
    assert outs[1].text == plain


def test_streamed_text_is_final(model, tok):
    """The plain text stream only carries text that will not change; the canvas shows the template."""
    eng = Engine(model)
    out = fill(eng, T1)
    events = list(eng.stream("x = 1\n", SamplingParams(template=T1, temperature=0, stream_canvas=True)))
    text = ""
    for ev in events:
        text += ev.delta
        assert out.text.startswith(text)
        assert ev.canvas is not None
    assert text == out.text
    mask = eng.mask_id
    assert events[0].canvas.count(mask) > 0 and events[-1].canvas.count(mask) == 0
    first = tok.encode("def ", allow_special=False)
    assert events[0].canvas[: len(first)] == first  # the fixed span is there from the first step


def test_what_each_kind_sees(model):
    """Full attention (one canvas) sees the whole template; a chain hole sees the fixed span after
    it (fill-in-the-middle) but nothing beyond the next hole."""
    eng = Engine(model)
    base = ["def f(a):\n    ", Hole(6), "\n    return a\n", Hole(4), "\n"]
    next_span = ["def f(a):\n    ", Hole(6), "\n    yield self.items\n", Hole(4), "\n"]
    beyond = ["def f(a):\n    ", Hole(6), "\n    return a\n", Hole(4), "\nclass Stack:\n    def push(self, x):\n"]
    first = {k: fill(eng, t).holes[0].text for k, t in [("base", base), ("next", next_span), ("beyond", beyond)]}
    assert first["base"] != first["next"]  # both modes see the span right after the hole
    if template_mode(model) == "canvas":  # full attention: one canvas
        assert first["base"] != first["beyond"]
    else:
        assert first["base"] == first["beyond"]


def test_hole_ends_at_a_stop_token(tok):
    """A model that writes EOS ends the hole there (stripped; the rest of the hole is not decoded)."""
    m = random_pretrained(tok, "full", max_seq_len=128, peak=2.0)
    eng = Engine(m)
    before = fill(eng, T1)
    with torch.no_grad():  # make EOS win wherever the hole's most frequent token did
        common = max(set(before.token_ids), key=before.token_ids.count)
        m.net.lm_head.weight[tok.eos_id] = m.net.lm_head.weight[common] * 1.5
    out = fill(Engine(m), T1)
    check_shape(out, T1, tok)
    assert any(h.finish_reason == "stop" for h in out.holes)
    assert out.finish_reason in ("stop", "length")


def test_close_holes_fills_after_the_stop(tok):
    m = random_pretrained(tok, "full", max_seq_len=64)
    s = resolve(m, SamplingParams(max_tokens=8), 2)
    r = Request("r", [5, 6], [], s, None, region=[-1, -1, -1, 7, -1, -1, -1, -1], holes=[(2, 5), (6, 10)])
    r.set_mask_id(m.config.mask_token_id)
    r.stop_ids = frozenset({tok.eos_id})
    r.canvas[7] = tok.eos_id  # the second hole's second position
    assert close_holes(r) == [6, 7]
    assert r.canvas[8:10].tolist() == [tok.eos_id] * 2 and int(r.canvas[6]) == m.config.mask_token_id
    assert close_holes(r) == []  # nothing left to close
    # a block of fixed text only is never decoded: no span, and the steps are shared by the masks
    r2 = Request("r2", [5, 6], [], s, None, region=[-1, -1, 7, 7, 7, 7, -1, -1], holes=[(2, 4), (8, 10)])
    assert r2.spans == [(2, 4), (8, 10)] and r2.block_steps == [2, 2]


def test_tight_kv_budget_keeps_templates(tok):
    """A KV budget of about one request makes the scheduler queue (and a chain's next hole wait):
    every template still writes what it writes alone."""
    m = random_pretrained(tok, "block", max_seq_len=128)
    alone = [fill(Engine(m), t).text for t in (T1, T2)]
    with pytest.raises(UserError, match="template: its requests need up to 41 tokens of KV cache"):
        Engine(m, kv_budget_tokens=32).add_request("x = 1\n", SamplingParams(template=T1))
    eng = Engine(m, max_batch=4, kv_budget_tokens=44)
    ids = [eng.add_request("x = 1\n", SamplingParams(template=t, temperature=0)) for t in (T1, T2, T1, T2)]
    outs, most = {}, 0
    while eng.has_work():
        for ev in eng.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
        most = max(most, eng.num_running)
    assert [outs[i].text for i in ids] == alone * 2
    assert most < 4


# ---- the shipped model and the family fixtures ----------------------------------------------------
def test_shipped_model_fills_a_function():
    import unmask

    m = unmask.load(Path(__file__).resolve().parents[1] / "models" / "unmask-coder")
    eng = Engine(m)
    t = ["def add(a, b):\n    ", Hole(8), "\n\ndef sub(a, b):\n    return a - b\n"]
    out = fill(eng, t, prompt="")
    check_shape(out, t, m.tokenizer)
    assert out.holes[0].text.startswith("return a + b")  # healed: the indentation is the template's


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/fixtures/families (CI has it)")
@pytest.mark.parametrize("family", ["llada-tiny", "dream-tiny", "sdar-tiny"])
def test_family_fixtures(family):
    import unmask

    m = unmask.load(SHARED / family)
    eng = Engine(m, max_batch=4)
    t = ["def f(x):\n    ", Hole(6), "\n    return y\n", Hole(4), "\n"]
    alone = fill(eng, t, prompt="# f\n")
    check_shape(alone, t, m.tokenizer)
    outs = eng.generate(["# f\n", "# g\n"], [SamplingParams(template=t, temperature=0)] * 2)
    assert outs[0].text == alone.text


# ---- HTTP ----------------------------------------------------------------------------------------
def test_http_template(tok):
    import json

    import httpx
    from openai import OpenAI

    from test_server_support import live

    m = random_pretrained(tok, "full", max_seq_len=128, peak=2.0)
    want = fill(Engine(m), T1)
    body = {"prompt": "x = 1\n", "template": ["def ", {"hole": 5}, "(a, b):\n    return ", {"hole": 6}, "\n\nclass Stack:\n"],
            "temperature": 0}
    with live(m, max_tokens_limit=32) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
        c = r["choices"][0]
        assert c["text"] == want.text and c["finish_reason"] == want.finish_reason
        assert c["holes"] == [{"text": h.text, "finish_reason": h.finish_reason, "tokens": len(h.token_ids)}
                              for h in want.holes]
        # the official client sends it through extra_body
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        got = client.completions.create(model=srv.state.model_name, prompt="x = 1\n", temperature=0,
                                        extra_body={"template": body["template"]})
        assert got.choices[0].text == want.text and got.choices[0].model_extra["holes"] == c["holes"]
        # streamed: the text deltas add up, the last chunk lists the holes; diffusing shows the canvas
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True, "diffusing": True},
                          timeout=60) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == want.text
        assert chunks[-1]["choices"][0]["holes"] == c["holes"]
        assert chunks[0]["choices"][0]["canvas"]["masked"] > 0 and chunks[-1]["choices"][0]["canvas"]["masked"] == 0
        # bad input: a 400 naming the field
        for bad, param in [({"template": ["a"]}, "template"), ({"template": ["a", {"hole": 0}]}, "template.1"),
                           ({"template": ["a", {"hole": 100}, "b"]}, "template"),
                           ({"template": ["a", {"hole": 2}, {"hole": 2}]}, "template"),
                           ({"template": ["a", {"hole": 4}], "suffix": "z"}, "suffix"),
                           ({"template": ["a", {"hole": 4}, "b"], "prompt": [1, 2]}, "prompt")]:
            resp = httpx.post(f"{srv.url}/v1/completions", json={**body, **bad}, timeout=60)
            assert resp.status_code == 400, (bad, resp.text)
            assert resp.json()["error"]["param"] == param, (bad, resp.json())
