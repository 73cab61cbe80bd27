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
