"""Prompt healing in the engine (engine/healing.py): a text prompt ending in a newline plus indentation
is sent without that whitespace, the first generated position may only hold tokens consistent with
it, and the text comes back relative to the original prompt."""
from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch

import unmask
from conftest import random_pretrained
from test_engine import run_loop
from test_server_support import live, tiny, tiny_dir  # noqa: F401  (fixtures)
from unmask.cli import main
from unmask.engine import Engine, SamplingParams
from unmask.engine.healing import ASCII_WHITESPACE, HealMasks, split_trailing_whitespace, unheal
from unmask.sampling import propose_batch, reference_generate
from unmask.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(120)
REAL_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "unmask-coder" / "tokenizer.json"
ATTENTIONS = ["block", "causal", "full"]
STRIPPED = "def add(a, b):"


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The machine is shared: tiny models on one intra-op thread."""


@pytest.fixture
def make(tok):
    return lambda attention, seed=0: random_pretrained(tok, attention, seed=seed, max_seq_len=64)


def force(model, per_position: dict[int, int] | None = None, everywhere: int | None = None) -> None:
    """Rewrite the model's logits: the token `per_position[p]` all but certain at absolute canvas
    position p, and/or `everywhere` strongly preferred at every position."""
    orig = model.net.forward
    causal = model.config.attention == "causal"

    def forward(idx, positions=None, attn_mask=None, kv_cache=None, logits_from=0, logits_to=None,
                logits_at=None, **extra):
        logits = orig(idx, positions, attn_mask, kv_cache, logits_from, logits_to, logits_at, **extra).clone()
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        pos = pos.gather(1, logits_at) if logits_at is not None else pos[:, logits_from:logits_to]
        pos = pos + 1 if causal else pos  # a causal model's logits at p predict position p + 1
        if everywhere is not None:
            logits[..., everywhere] += 1e3
        for p, t in (per_position or {}).items():
            logits[pos == p, t] += 1e4
        return logits

    model.net.forward = forward


def allowed_ids(model, ws: str) -> set[int]:
    tok = model.tokenizer
    return {i for i in range(tok.vocab_size)
            if (t := tok.decode([i], skip_special=True)) and (t.startswith(ws) or ws.startswith(t))}


def stream(engine, prompts, params):
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    events = {r: [] for r in rids}
    while engine.has_work():
        for ev in engine.step():
            events[ev.request_id].append(ev)
    return [events[r] for r in rids]


# ---- the pieces -----------------------------------------------------------------------------------

def test_split_takes_ascii_whitespace_with_a_newline_only():
    assert split_trailing_whitespace("x:\n    ", ASCII_WHITESPACE) == ("x:", "\n    ")
    assert split_trailing_whitespace("x:\r\n\t", ASCII_WHITESPACE) == ("x:", "\r\n\t")
    assert split_trailing_whitespace("x: ", ASCII_WHITESPACE) == ("x: ", "")
    assert split_trailing_whitespace("x\n\u3000", ASCII_WHITESPACE) == ("x\n\u3000", "")
    assert split_trailing_whitespace("\n  ", ASCII_WHITESPACE) == ("\n  ", "")


@pytest.mark.parametrize("text, ws, out", [
    ("\n    return x", "\n    ", "return x"),
    ("\n        return x", "\n    ", "    return x"),  # deeper indentation: the extra stays
    ("\n\nx", "\n    ", "\nx"),  # only "\n" of ws was written: drop it, keep the rest
    ("\n  ", "\n    ", ""),  # still a prefix of ws: nothing to show yet
    ("return", "\n", "return"),
    ("abc", "", "abc"),
])
def test_unheal(text, ws, out):
    assert unheal(text, ws) == out


def test_allowed_mask_on_the_real_tokenizer():
    tok = Tokenizer.from_file(REAL_TOKENIZER)
    masks = HealMasks(tok, tok.vocab_size, "cpu")
    texts = [tok.decode([i], skip_special=True) for i in range(tok.vocab_size)]
    for ws in ("\n", "\n    ", "\n\n", "\n\t\t", "  \n", "\r\n  "):
        m = masks(ws)
        assert m.shape == (tok.vocab_size,) and m.dtype == torch.bool
        want = [bool(t) and (t.startswith(ws) or ws.startswith(t)) for t in texts]
        assert m.tolist() == want, ws
        assert masks(ws) is m  # computed once per distinct ws
    m = masks("\n    ")
    for t in ("\n", "\n   ", "\n    ", "\n        "):
        assert m[tok.encode(t)[0]] and len(tok.encode(t)) == 1, repr(t)
    for bad in ("def", " return", "\n\n", " "):
        assert not m[tok.encode(bad)[0]], repr(bad)
    assert not m[[tok.eos_id, tok.mask_id, tok.pad_id]].any()
    assert HealMasks(tok, 10, "cpu")("\n") is None  # nothing fits (specials only): no healing


def test_propose_batch_allowed_masks_only_the_named_positions():
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 50)
    ok = torch.zeros(2, 50, dtype=torch.bool)
    ok[0, [7, 9]] = True
    ok[1, 20] = True
    args = (logits, 1, torch.zeros(3), torch.ones(3), [None] * 3)
    plain = propose_batch(*args)
    got = propose_batch(*args, allowed=(torch.tensor([0, 2]), torch.tensor([1, 3]), ok))
    assert int(got.tokens[0, 1]) in (7, 9) and int(got.tokens[2, 3]) == 20
    assert float(got.confidence[2, 3]) == 1.0  # the constrained distribution
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 1] = keep[2, 3] = False
    assert torch.equal(got.tokens[keep], plain.tokens[keep])
    assert torch.equal(got.confidence[keep], plain.confidence[keep])


# ---- the engine -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("suffix", [None, "\n\nprint(add(1, 2))"])
def test_first_generated_token_is_constrained(make, attention, suffix):
    model = make(attention)
    other = model.tokenizer.encode("return")[0]  # not whitespace: the model wants it everywhere
    force(model, everywhere=other)
    engine = Engine(model)
    prompt = STRIPPED + "\n    "
    healed = engine.generate([prompt], SamplingParams(max_tokens=6, suffix=suffix))[0]
    raw = engine.generate([prompt], SamplingParams(max_tokens=6, suffix=suffix, heal=False))[0]
    assert raw.token_ids == [other] * 6  # unhealed, the model goes its own way at once
    assert healed.token_ids[0] in allowed_ids(model, "\n    ") and healed.token_ids[1:] == [other] * 5
    tok = model.tokenizer
    assert healed.completion_tokens == 6  # what the model wrote, the healed whitespace included
    assert raw.prompt_tokens - healed.prompt_tokens == len(tok.encode(prompt)) - len(tok.encode(STRIPPED))
    written = tok.decode(healed.token_ids)
    assert healed.text == unheal(written, "\n    ") and healed.text.endswith(tok.decode([other]) * 5)
    # sampling rows are constrained too
    hot = engine.generate([prompt], SamplingParams(max_tokens=6, suffix=suffix, temperature=1.0, seed=5))[0]
    assert hot.token_ids[0] in allowed_ids(model, "\n    ")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_the_constraint_applies_while_the_first_position_is_open_and_only_then(make, attention, monkeypatch):
    import unmask.engine.core as engine_mod

    model = make(attention)
    engine = Engine(model)
    seen, orig = [], engine_mod.propose_batch

    def spy(*a, allowed=None, **k):
        seen.append(None if allowed is None else allowed[:2])
        return orig(*a, allowed=allowed, **k)

    monkeypatch.setattr(engine_mod, "propose_batch", spy)
    engine.generate([STRIPPED], SamplingParams(max_tokens=6))
    assert seen and all(s is None for s in seen)  # nothing healed: nothing to pay
    seen.clear()
    out = engine.generate([STRIPPED + "\n"], SamplingParams(max_tokens=6, policy="topk", steps=6))[0]
    assert seen[0] is not None and [r.tolist() for r in seen[0]] == [[0], [0]]
    # topk with one token per step: the first position may be committed later than the first step
    # (block and full decode by confidence), but once it is the constraint is gone for good
    first_free = next((i for i, s in enumerate(seen) if s is None), len(seen))
    assert all(s is None for s in seen[first_free:]) and out.token_ids[0] in allowed_ids(model, "\n")
    if attention == "causal":
        assert first_free == 1


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_text_is_relative_to_the_original_prompt(make, attention):
    model = make(attention)
    tok = model.tokenizer
    nl = tok.encode("\n")[0]
    force(model, everywhere=nl)  # the model writes only "\n" of "\n    ", then more newlines
    out = Engine(model).generate([STRIPPED + "\n    "], SamplingParams(max_tokens=5))[0]
    assert out.token_ids == [nl] * 5 and out.text == "\n" * 4


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_stops_apply_after_unhealing_and_deltas_add_up(make, attention):
    model = make(attention)
    tok = model.tokenizer
    lo = len(tok.encode(STRIPPED))
    plan = [tok.encode("\n   ")[0], tok.encode(" ret")[0], tok.encode("urn")[0], tok.encode("\n")[0]]
    force(model, per_position={lo + i: t for i, t in enumerate(plan)})
    engine = Engine(model)
    prompt = STRIPPED + "\n    "  # the model writes "\n   " + " ret": the healed whitespace, then "ret"
    params = [SamplingParams(max_tokens=10, stop=["\n"]), SamplingParams(max_tokens=10, stop=["urn"]),
              SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, stop=["\n"], heal=False)]
    results = stream(engine, [prompt] * 4, params)
    for events, sp in zip(results, params):
        final = events[-1].output
        assert events[-1].finished and "".join(e.delta for e in events) == final.text
    stop_nl, stop_urn, plain, raw = (evs[-1].output for evs in results)
    assert (stop_nl.text, stop_nl.finish_reason) == ("return", "stop")  # not cut at the healed newline
    assert stop_nl.token_ids == tok.encode("\n    return")  # what the model wrote, up to the stop
    assert (stop_urn.text, stop_urn.finish_reason) == ("ret", "stop")
    assert plain.text.startswith("return\n") and plain.token_ids[:4] == plan
    for events in results[:3]:  # the healed whitespace is never streamed
        assert "ret".startswith(next(e.delta for e in events if e.delta)[:3])  # stops hold some back
    # unhealed, the prompt keeps its "\n   " + " " and the model's "\n   " + " ret" lands two later
    assert (raw.text, raw.finish_reason) == ("urn", "stop")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_heal_false_and_unhealable_prompts_are_unchanged(make, attention):
    model = make(attention)
    engine = Engine(model)
    tok = model.tokenizer
    for prompt in (STRIPPED + "\n", STRIPPED + "\n    ", STRIPPED + "\n\n"):
        off = engine.generate([prompt], SamplingParams(max_tokens=7, heal=False))[0]
        ids = engine.generate([tok.encode(prompt)], SamplingParams(max_tokens=7))[0]  # ids are never healed
        assert (off.text, off.token_ids, off.nfe, off.finish_reason, off.prompt_tokens) == \
               (ids.text, ids.token_ids, ids.nfe, ids.finish_reason, ids.prompt_tokens)
    for prompt in (STRIPPED, STRIPPED + " ", "\n  "):  # no newline in the trailing whitespace, or nothing left
        on, off = (engine.generate([prompt], SamplingParams(max_tokens=7, heal=h))[0] for h in (True, False))
        assert (on.text, on.token_ids, on.nfe) == (off.text, off.token_ids, off.nfe)


@pytest.mark.parametrize("attention,cache", [("block", "exact"), ("block", "none"), ("causal", "exact"),
                                             ("causal", "none"), ("full", "dual")])
def test_batch_invariance_with_healed_and_plain_requests_mixed(make, attention, cache):
    model = make(attention, seed=1)
    tails = ["\n", "\n    ", "\n\t", "", " ", "\n        "]
    multi = 0
    for mix in range(4):
        rng = random.Random(mix)
        items = []
        for k in range(rng.randint(3, 6)):
            prompt = rng.choice(["def add(a, b):", "class Stack:", "    def push(self, x):"]) + rng.choice(tails)
            sp = SamplingParams(max_tokens=rng.randint(2, 12), temperature=0.0, heal=rng.random() < 0.8,
                                policy=rng.choice(["topk", "threshold", "entropy"]), threshold=0.3,
                                stop=rng.choice([None, ["\n"], ["a"]]),
                                suffix=rng.choice([None, None, "\nprint(1)"]))
            items.append((rng.randint(0, 3), prompt, sp))
        engine = Engine(model, cache=cache, max_batch=4)
        alone = [engine.generate([p], sp)[0] for _, p, sp in items]
        running = []
        outs = run_loop(engine, items, on_step=lambda e: running.append(e.num_running))
        multi += sum(n > 1 for n in running)
        for i, (a, b) in enumerate(zip(alone, outs)):
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason), (mix, i, items[i])
            assert a.nfe <= b.nfe, (mix, i)  # lookahead rows ride in free batch slots
    assert multi  # the mixes really were batched


# ---- the surfaces: HTTP and CLI -------------------------------------------------------------------

def test_server_heal_field(tiny):  # noqa: F811
    prompt, suffix = STRIPPED + "\n    ", "\n\nprint(add(1, 2))"
    want = {(h, sfx): Engine(tiny).generate([prompt], SamplingParams(max_tokens=8, temperature=0, heal=h,
                                                                     suffix=sfx))[0].text
            for h in (True, False) for sfx in (None, suffix)}
    assert want[True, None] != want[False, None]  # healing shows on this prompt
    with live(tiny) as s:
        def post(path, **body):
            r = httpx.post(s.url + path, json={"prompt": prompt, "max_tokens": 8, "temperature": 0, **body}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        assert post("/v1/completions") == want[True, None]
        assert post("/v1/completions", heal=False) == want[False, None]
        assert post("/v1/completions", heal=True, suffix=suffix) == want[True, suffix]
        assert post("/v1/fim/completions", suffix=suffix) == want[True, suffix]
        assert post("/v1/fim/completions", suffix=suffix, heal=False) == want[False, suffix]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "heal": False}
        r = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "heal"  # chats are never healed


def test_cli_no_heal(tiny_dir, capsys):  # noqa: F811
    prompt = STRIPPED + "\n    "
    texts = {}
    for flags in ((), ("--no-heal",), ("--reference",), ("--reference", "--no-heal")):
        main(["generate", "--model", str(tiny_dir), "--max-tokens", "6", "--temperature", "0", "--json",
              *flags, prompt])
        texts[flags] = json.loads(capsys.readouterr().out)["text"]
    model = unmask.load(tiny_dir)
    for heal, flags in ((True, ()), (False, ("--no-heal",))):
        assert texts[flags] == Engine(model).generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                                               heal=heal))[0].text
    assert texts[("--reference", "--no-heal")] == reference_generate(model, prompt, max_tokens=6, temperature=0).text
    assert texts[("--reference",)] == unheal(reference_generate(model, STRIPPED, max_tokens=6, temperature=0).text,
                                             "\n    ")
