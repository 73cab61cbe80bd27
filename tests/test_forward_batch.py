"""The model's input contract (model/inputs.py): one typed ForwardBatch per forward."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from unmask.model import ForwardBatch, Transformer


def test_a_batch_and_keywords_are_the_same_forward():
    net = Transformer(tiny_config(attention="block", token_shift=True)).eval()
    ids = torch.randint(0, 40, (2, 12))
    pos = torch.arange(12)
    at = torch.tensor([[3, 4], [10, 11]])
    want = net(ids, positions=pos, logits_at=at)
    assert torch.equal(net(ForwardBatch(ids, positions=pos, logits_at=at)), want)
    assert torch.equal(net(ForwardBatch(ids))[:, 3:5], net(ids, logits_from=3, logits_to=5))
    with pytest.raises(TypeError, match="not both"):
        net(ForwardBatch(ids), positions=pos)


@pytest.mark.parametrize("attention", ["full", "block"])
def test_long_inference_forwards_attend_in_query_chunks_with_the_same_logits(attention, monkeypatch):
    """A long full-attention canvas is attended in query chunks (model/attention.py QUERY_CHUNK)."""
    import unmask.model.attention as A

    net = Transformer(tiny_config(attention=attention, max_seq_len=64)).eval()
    ids = torch.randint(0, 40, (2, 50))
    calls = []
    sdpa = A.F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))
    with torch.no_grad():
        whole = net(ids)
        monkeypatch.setattr(A, "QUERY_CHUNK", 16)
        calls.clear()
        chunked = net(ids)
    assert max(calls) == 16 and len(calls) == 4 * net.config.n_layers
    assert torch.allclose(chunked, whole, atol=1e-5)
