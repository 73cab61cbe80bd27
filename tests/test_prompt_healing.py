"""Evaluation prompts that end in a newline are sent without it, and completions come back relative to
the original prompt (eval/generate.py: split_trailing_whitespace, run_tasks(heal=True))."""
from __future__ import annotations

import pytest

from conftest import random_pretrained
from unmask.eval.generate import Decoding, Task, run_tasks, split_trailing_whitespace


@pytest.mark.parametrize("prompt, sent, ws", [
    ('def f(x):\n    """Doc."""\n', 'def f(x):\n    """Doc."""', "\n"),
    ("def f(x):\n    y = 1\n    ", "def f(x):\n    y = 1", "\n    "),
    ("def f(x):", "def f(x):", ""),  # no trailing whitespace
    ("def f(x): ", "def f(x): ", ""),  # a space with no newline merges forwards already
    ("\n\n", "\n\n", ""),  # nothing would be left
])
def test_split_trailing_whitespace(prompt, sent, ws):
    assert split_trailing_whitespace(prompt) == (sent, ws)
    assert sent + ws == prompt


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_healed_completion_is_the_stripped_prompts_completion_minus_the_whitespace(tok, attention, single_thread):
    model = random_pretrained(tok, attention, max_seq_len=96)
    prompt = "def add(a, b):\n"
    dec = Decoding("greedy", "engine", "topk", steps_ratio=1.0)
    raw = run_tasks(model, [Task(prompt.rstrip())], dec, max_tokens=12, heal=False).completions[0].text
    healed = run_tasks(model, [Task(prompt)], dec, max_tokens=12).completions[0].text
    assert healed == (raw[1:] if raw.startswith("\n") else raw)
    # stop strings apply to the healed text afterwards, not to the newline the model writes first
    stopped = run_tasks(model, [Task(prompt)], dec, max_tokens=12, stop=["b"]).completions[0].text
    assert stopped == healed.split("b", 1)[0]
    ref = run_tasks(model, [Task(prompt)], Decoding("ref", "reference", "topk", steps_ratio=1.0),
                    max_tokens=12).completions[0].text
    assert ref == healed  # the reference sampler is healed the same way
