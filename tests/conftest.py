"""Shared fixtures. Keep this small: helpers that more than one test module needs."""
from __future__ import annotations

import pytest
import torch

from unmask.config import OBJECTIVE_ATTENTION, ModelConfig
from unmask.tokenizer import Tokenizer, train_tokenizer

_ATTENTION_OBJECTIVE = {v: k for k, v in OBJECTIVE_ATTENTION.items()}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A tiny code tokenizer for engine and sampler tests (a module may define its own `tok`)."""
    text = "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    return train_tokenizer([text] * 10, vocab_size=300)


def random_pretrained(tok, attention: str, *, seed: int = 0, block_size: int = 4, max_seq_len: int = 64,
                      peak: float = 1.0, **overrides):
    """A random tiny model with large weights (decisive logits, no near-ties); `peak` > 1 sharpens
    every distribution (scales the final norm, hence the logits)."""
    from unmask.config import GenerationConfig
    from unmask.model import Transformer
    from unmask.pretrained import Pretrained

    cfg = tiny_config(attention=attention, block_size=block_size, max_seq_len=max_seq_len,
                      vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, **overrides)
    torch.manual_seed(seed)
    net = Transformer(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        net.norm.weight.mul_(peak)
    return Pretrained(net, tok, cfg, GenerationConfig(block_size=block_size, max_tokens=16))


def tiny_config(**overrides) -> ModelConfig:
    """A small ModelConfig; `attention=` alone picks the matching objective (and vice versa)."""
    kw = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, block_size=4,
              vocab_size=40, mask_token_id=1, eos_token_id=0, pad_token_id=2)
    if "attention" in overrides and "objective" not in overrides:
        overrides["objective"] = _ATTENTION_OBJECTIVE[overrides["attention"]]
    if "objective" in overrides and "attention" not in overrides:
        overrides["attention"] = OBJECTIVE_ATTENTION[overrides["objective"]]
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only spin against other work."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
