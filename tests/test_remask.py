"""Self-correction by remasking (decode/remask.py): a verification row never changes its request's
own row (a threshold nothing falls below writes exactly what no remasking writes), revisions are
bounded so every request finishes, the text stream carries only text that will not change, the
diffusing stream reports revised positions, batched == alone, and the refusals."""
from __future__ import annotations

import pytest

from conftest import random_pretrained
from unmask import Hole
from unmask.decode import remask
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["def add(a, b):\n", "class Stack:\n", "x = 1\n"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine."""


@pytest.fixture(scope="module", params=[("block", "auto"), ("full", "dual"), ("full", "none")])
def setup(request, tok):
    attention, cache = request.param
    return random_pretrained(tok, attention, max_seq_len=96, peak=0.7), cache


def run(model, cache, prompts, **kw):
    eng = Engine(model, cache=cache, lookahead=False, max_batch=8)
    return eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0, **kw))


def test_nothing_below_the_threshold_changes_nothing(setup):
    model, cache = setup
    off = run(model, cache, PROMPTS)
    tiny = run(model, cache, PROMPTS, remask=1e-12)
    assert [o.token_ids for o in tiny] == [o.token_ids for o in off]


def test_revisions_happen_are_bounded_and_finish(setup, monkeypatch):
    model, cache = setup
    judged = []
    real = remask.judge

    def spy(r, p, logits):
        out = real(r, p, logits)
        judged.append((r.id, p, out))
        return out

    monkeypatch.setattr(remask, "judge", spy)
    outs = run(model, cache, PROMPTS, remask=0.9)
    revised = [(rid, p) for rid, p, out in judged if out]
    assert revised  # a high threshold on a random model revises
    assert len(revised) == len(set(revised))  # each position at most MAX_REVISIONS (1) times
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert all(len(o.token_ids) <= 24 for o in outs)


def test_batched_equals_alone(setup):
    model, cache = setup
    batched = run(model, cache, PROMPTS, remask=0.5)
    alone = [run(model, cache, [p], remask=0.5)[0] for p in PROMPTS]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]


def test_streams(setup):
    """Text deltas never change (they stop before the block being decoded); the canvas reports the
    revised positions, which are masked again in that step's canvas."""
    model, cache = setup
    eng = Engine(model, cache=cache, lookahead=False)
    text, revised = "", 0
    for ev in eng.stream(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, remask=0.9, stream_canvas=True)):
        text += ev.delta
        for p in ev.revised or []:
            assert ev.canvas[p] == eng.mask_id
            revised += 1
        final = ev.output
    assert text == final.text and revised > 0
    # every delta was a prefix of the final text when it was sent
    eng2 = Engine(model, cache=cache, lookahead=False)
    shown = ""
    for ev in eng2.stream(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, remask=0.9)):
        shown += ev.delta
        if ev.finished:
            assert shown == ev.output.text
    assert shown


def test_templates_keep_their_text(tok):
    m = random_pretrained(tok, "full", max_seq_len=96, peak=0.7)
    t = ["def ", Hole(5), "(a, b):\n    return ", Hole(6), "\n"]
    out = Engine(m, lookahead=False).generate(["x = 1\n"], SamplingParams(template=t, temperature=0, remask=0.9))[0]
    it = iter(out.holes)
    assert out.text == "".join(s if isinstance(s, str) else next(it).text for s in t)


def test_refusals(tok):
    ar = Engine(random_pretrained(tok, "causal", max_seq_len=64))
    with pytest.raises(UserError, match="remask applies to diffusion models"):
        ar.add_request("x", SamplingParams(remask=0.3))
    block = Engine(random_pretrained(tok, "block", max_seq_len=64))
    for bad in (1.0, -0.1, True, "0.3"):
        with pytest.raises(UserError, match="remask must be a probability"):
            block.add_request("x", SamplingParams(remask=bad))
    with pytest.raises(UserError, match="remask does not combine with response_format"):
        block.add_request("x", SamplingParams(remask=0.3, response_format={"type": "json_object"}))
    with pytest.raises(UserError, match="remask adds a verification row"):
        Engine(random_pretrained(tok, "block", max_seq_len=64), cuda_graphs=True).add_request(
            "x", SamplingParams(remask=0.3))
    assert not block.has_work()


def test_http(tok):
    import json

    import httpx

    from test_server_support import live

    m = random_pretrained(tok, "block", max_seq_len=96, peak=0.7)
    want = run(m, "auto", [PROMPTS[0]], remask=0.9)[0]
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "remask": 0.9}
    with live(m, engine_options={"lookahead": False}) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["text"] == want.text
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True, "diffusing": True},
                          timeout=60) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
        assert any(c["choices"][0]["canvas"].get("revised") for c in chunks)
        bad = httpx.post(f"{srv.url}/v1/completions", json={**body, "remask": 1.5}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "remask"


def test_template_stream_is_final(tok):
    """On one canvas too, the text stream never shows a token that a later step revises."""
    m = random_pretrained(tok, "full", max_seq_len=96, peak=0.7)
    t = ["def ", Hole(7), "(a, b):\n    return ", Hole(9), "\n"]
    eng = Engine(m, lookahead=False)
    shown, revised = "", 0
    for ev in eng.stream("x = 1\n", SamplingParams(template=t, temperature=0, remask=0.9, stream_canvas=True,
                                                   block_size=4)):
        shown += ev.delta
        revised += len(ev.revised or [])
        if ev.finished:
            assert shown == ev.output.text
    assert revised > 0
