"""Decode plans (unmask.decode): one object per way of decoding, asked by the engine.

The token-for-token tests (engine == reference, batched == alone, lookahead == no lookahead) guard
the behaviour; these check the plans' own contracts and that the engine holds no mode strings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from unmask.decode import BlockExactPlan, CausalPlan, FullApproxPlan, NoCachePlan, Window, make_plan
from unmask.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "unmask"


def test_make_plan_picks_by_attention_and_cache():
    kinds = {
        ("block", "auto"): (BlockExactPlan, "exact"), ("block", "none"): (NoCachePlan, "none"),
        ("causal", "auto"): (CausalPlan, "exact"), ("causal", "none"): (CausalPlan, "none"),
        ("full", "auto"): (FullApproxPlan, "dual"), ("full", "prefix"): (FullApproxPlan, "prefix"),
        ("full", "none"): (NoCachePlan, "none"),
    }
    for (attention, cache), (cls, name) in kinds.items():
        plan = make_plan(tiny_config(attention=attention), cache)
        assert type(plan) is cls and plan.name == name
        assert plan.uses_cache == (name != "none")
    with pytest.raises(UserError, match="does not apply to block attention; choose one of: auto, exact, none"):
        make_plan(tiny_config(attention="block"), "dual")


def test_patterns():
    q = torch.tensor([[4, 5, 8]])
    k = torch.arange(10)[None]
    block = make_plan(tiny_config(attention="block", block_size=4)).attend(q, k)[0]
    assert block.sum(1).tolist() == [8, 8, 10]  # a query sees every key of its block and earlier blocks
    causal = make_plan(tiny_config(attention="causal")).attend(q, k)[0]
    assert causal.sum(1).tolist() == [5, 6, 9]
    assert make_plan(tiny_config(attention="full")).attend(q, k).all()


def test_logit_shift_is_where_scores_come_from():
    """An AR model's output at p scores p + 1: its window scores the next position from the last fed one."""
    plan = make_plan(tiny_config(attention="causal"))
    assert plan.logit_shift == 1 and plan.needs_prompt and plan.single_open
    for attention in ("block", "full"):
        p = make_plan(tiny_config(attention=attention))
        assert p.logit_shift == 0 and not p.needs_prompt and not p.single_open


def test_block_plan_window_feeds_the_position_before_the_block_when_shifted():
    class R:  # the request state a plan reads
        block, cached = (8, 12), 8
    assert BlockExactPlan(4).window(R()) == Window(8, 12, 12, 8, 12)
    assert BlockExactPlan(4, logit_shift=1).window(R()) == Window(7, 12, 12, 8, 12)
    assert not BlockExactPlan(4, logit_shift=1).lookahead and BlockExactPlan(4).lookahead


def test_engine_tests_no_mode_strings():
    """How a model is decoded is asked of its plan; the engine's files compare no mode strings."""
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](block|causal|full|exact|dual|prefix|none)["']""")
    for path in sorted((SRC / "engine").glob("*.py")):
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.name}: {hits}"


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_long_prompts_prefill_in_chunks_with_the_same_tokens(tok, attention):
    """A prompt longer than prefill_chunk is encoded into the cache over several forwards that score
    nothing; the tokens are those of one prefill, and the extra forwards are counted."""
    from conftest import random_pretrained
    from unmask.engine import Engine, SamplingParams

    model = random_pretrained(tok, attention, max_seq_len=96)
    prompts = [list(range(20, 20 + n)) for n in (45, 13, 30)]
    sp = SamplingParams(max_tokens=10, policy="threshold", threshold=0.5)
    whole = Engine(model, prefill_chunk=None).generate(prompts, sp)
    chunked = Engine(model, prefill_chunk=8).generate(prompts, sp)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert chunked[0].nfe > whole[0].nfe  # 45 prompt tokens take several chunk forwards
    windows = []
    engine = Engine(model, prefill_chunk=8, lookahead=False)
    plan_window = engine.plan.window
    engine.plan.window = lambda r: windows.append(plan_window(r)) or windows[-1]
    engine.generate([prompts[0]], sp)
    assert max(w.end - w.start for w in windows) <= 8 + 2 * 4  # no forward feeds the whole prompt
    with pytest.raises(UserError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)
