"""Compiled CPU decode steps (engine/cpu_compile.py): Engine(compile=True) on a CPU pads decode steps
to static (rows, window) buckets and runs each through one torch.compile'd step whose only dynamic
shape is the key length. Checked token for token against the eager engine, batched and alone."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.engine.cpu_compile import CompiledForward

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                 reason="Inductor's CPU backend needs a C++ compiler")]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """One intra-op thread (the machine is shared)."""


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 250, (n,), generator=g).tolist()


# Block attention only: the causal plan's steps go through the same buckets and custom op, and each
# compiled case costs about a minute of Inductor on 2 cores (the suite's budget is ~10 minutes).
@pytest.mark.parametrize("attention", ["block"])
def test_compiled_steps_equal_eager_engine(tok, attention):
    model = random_pretrained(tok, attention, seed=3, token_shift=attention == "block", block_size=4,
                              max_seq_len=96, n_layers=2)
    prompts = [prompt_ids(n, seed=n) for n in (3, 9, 14)]
    kw = {} if attention == "causal" else {"policy": "threshold", "threshold": 0.3}
    sp = SamplingParams(max_tokens=12, temperature=0.0, **kw)
    eager = Engine(model, max_batch=4).generate(prompts, sp)
    engine = Engine(model, max_batch=4, compile=True)
    assert isinstance(engine.runner.graphs, CompiledForward)
    batched = engine.generate(prompts, sp)
    alone = [engine.generate([p], sp)[0] for p in prompts]
    g = engine.runner.graphs
    # buckets of rows (1, 2, 4) x window lengths (powers of two up to two blocks), not one per step
    assert g.replays > 0 and 0 < g.compiled <= 3 * (1 if attention == "causal" else 4)
    for e, b, a in zip(eager, batched, alone):
        assert b.token_ids == e.token_ids == a.token_ids
        assert b.nfe == e.nfe
    # the pool was written in place by the compiled steps: a later eager-prefilled request still matches
    assert engine.generate([prompts[0]], sp)[0].token_ids == eager[0].token_ids
