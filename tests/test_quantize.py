"""Weight quantization for serving (engine/quantize.py): int8 and int8wo accuracy, batch invariance of
the per-row activation scales and of the weight-only kernel, the warning where int8 is slow, and bad
modes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.engine.quantize import MODES, Int8Linear, Int8WeightOnlyLinear, quantize_model
from unmask.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _int8_is_fast(monkeypatch):
    # The warning depends on the CPU; tests that want it say so.
    monkeypatch.setattr("unmask.engine.quantize.int8_speedup_cpu", lambda: 2.0)


def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    x = torch.randn(3, 5, 64)
    ref, q = lin(x), Int8Linear(lin)(x)
    assert q.shape == ref.shape
    rel = (q - ref).norm() / ref.norm()
    assert rel < 0.02, rel


def test_int8_rows_do_not_depend_on_their_batch():
    """Per-row activation scales: a row's result is the same alone, packed (2-D) or batched."""
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(6, 64)
    x[3] *= 100  # a row with a very different range must not change the others' scales
    whole = q(x)
    for i in range(6):
        torch.testing.assert_close(q(x[i:i + 1]), whole[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(q(x.view(2, 3, 64)).view(6, 32), whole, rtol=0, atol=0)


def assert_batched_equals_alone(eng, seed: int, lengths: tuple[int, ...]) -> None:
    """Random prompts of these lengths, greedy: each one's tokens batched equal its tokens alone."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(20, 250, (n,), generator=g).tolist() for n in lengths]
    sp = SamplingParams(max_tokens=10, temperature=0.0)
    together = eng.generate(prompts, sp)
    for p, out in zip(prompts, together):
        assert eng.generate([p], sp)[0].token_ids == out.token_ids


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_int8_engine_batched_equals_alone(tok, attention):
    model = random_pretrained(tok, attention, block_size=4, max_seq_len=64, peak=4.0)
    assert_batched_equals_alone(Engine(model, quantize="int8"), seed=1, lengths=(3, 9, 5))


def test_warns_where_int8_is_slow(tok, monkeypatch):
    model = random_pretrained(tok, "block", block_size=4, max_seq_len=64)
    monkeypatch.setattr("unmask.engine.quantize.int8_speedup_cpu", lambda: 0.125)
    with pytest.warns(RuntimeWarning, match=r"8\.0x slower than fp32 on this CPU"):
        quantize_model(model, "int8")
    monkeypatch.setattr("unmask.engine.quantize.int8_speedup_cpu", lambda: 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, "int8")


def test_unknown_mode_is_a_user_error(tok):
    model = random_pretrained(tok, "block", block_size=4, max_seq_len=64)
    with pytest.raises(UserError, match="unknown quantization 'int4'; choose one of: int8, int8wo, bf16"):
        quantize_model(model, "int4")


def test_int8_weight_only_linear_matches_its_dequantised_weights():
    """The int8 weights times their scales are the layer's weights, to int8 rounding; the product is
    that matrix times the input, to bf16 rounding of the input and output."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    q = Int8WeightOnlyLinear(lin)
    deq = q.qweight.float() * q.scale[:, None]
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127
    assert (deq - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # round to nearest
    x = torch.randn(3, 5, 64)
    y = q(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    ref = x @ deq.t()
    assert (y - ref).norm() / ref.norm() < 0.01
    assert (y - lin(x)).norm() / lin(x).norm() < 0.02


def test_int8_weight_only_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    q = Int8WeightOnlyLinear(nn.Linear(64, 32, bias=False))
    x = torch.randn(7, 64)
    whole = q(x)
    for i in range(7):
        torch.testing.assert_close(q(x[i:i + 1]), whole[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(q(x[2:6]), whole[2:6], rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_int8wo_engine_batched_equals_alone(tok, attention):
    model = random_pretrained(tok, attention, block_size=4, max_seq_len=64, peak=4.0)
    eng = Engine(model, quantize="int8wo")
    assert isinstance(eng.net.lm_head, Int8WeightOnlyLinear)
    assert eng.net.embed.weight.dtype == torch.float32  # lookups stay exact; only the matmuls change
    assert model.net.lm_head.weight is model.net.embed.weight  # the original is left as it was
    assert_batched_equals_alone(eng, seed=2, lengths=(4, 11, 6))


def test_int8wo_never_warns(tok, monkeypatch):
    model = random_pretrained(tok, "block", block_size=4, max_seq_len=64)
    monkeypatch.setattr("unmask.engine.quantize.int8_speedup_cpu", lambda: 0.125)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, "int8wo")


def test_cli_offers_the_engine_modes():
    from unmask.cli import QUANT_MODES
    assert QUANT_MODES == MODES
