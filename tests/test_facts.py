"""A fine-tune that provably teaches, at test size: bench/facts.py's experiment (synthetic key -> value
facts in chat form that the embedded model cannot know, `unmask finetune --data F --out D --val-frac 0
--epochs 8` with every other setting at its default, `unmask serve`, every fact asked through
/v1/chat/completions at temperature 0) on a few facts. The bench-sized version (200 facts) is in
bench/facts.py and its figures in the README."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from facts import run  # noqa: E402

pytestmark = pytest.mark.timeout(900)
N = 24


@pytest.mark.slow
def test_default_finetune_teaches_every_fact(tmp_path):
    res = run(N, tmp_path)
    assert res["command"].endswith("--val-frac 0 --epochs 8")  # nothing else: every other setting at its default
    assert res["exact"] >= N - 1, res["wrong_examples"]
    assert res["steps"] == 8 * N // 4  # the default batch of 4
