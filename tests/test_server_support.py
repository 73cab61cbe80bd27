"""Shared pieces of the server tests (no tests here): a tiny model that writes readable text, and
live servers on loopback.

The tiny model is random, but its output head is zeroed for every token that does not decode to
printable ASCII, so greedy decoding picks readable tokens (their random logits beat 0), and the
mask embedding is zero, so different prompts give visibly different texts: comparing texts means
something.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import torch

import unmask
from unmask.config import GenerationConfig, ModelConfig
from unmask.engine import Engine
from unmask.model import Transformer
from unmask.server import LiveServer, ServerConfig, create_app
from unmask.tokenizer import train_tokenizer

TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
        "    def pop(self):\n        return self.items.pop()\n\nfor i in range(10):\n    print(i * 2)\n") * 3


def build_tiny(out: Path, max_seq_len: int = 64) -> Path:
    tok = train_tokenizer([TEXT], 320)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len, attention="block",
                      objective="bd3lm", block_size=4, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_embeddings=False)
    torch.manual_seed(0)
    net = Transformer(cfg)
    with torch.no_grad():
        net.embed.weight[tok.mask_id] = 0  # masked positions then take their content from the prompt
        for t in range(tok.vocab_size):
            s = tok.decode([t])
            special = t in tok.special_ids.values() and t != tok.eos_id
            if special or not (s and s.isascii() and (s.isprintable() or s.strip(" \n") == "")):
                net.lm_head.weight[t] = 0
    return unmask.save(net, out, tokenizer=tok, generation=GenerationConfig(block_size=4, max_tokens=8))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("server-model") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return unmask.load(tiny_dir)


@contextlib.contextmanager
def live(model, **cfg):
    """A server for `model` on a free port; `engine_options` go to the Engine."""
    engine = Engine(model, max_batch=cfg.pop("max_batch", 8), **cfg.pop("engine_options", {}))
    app = create_app(model, ServerConfig(**cfg), engine)
    with LiveServer(app) as srv:
        srv.state = app.state.unmask
        yield srv


def slow_down(engine, seconds: float) -> None:
    """Make every engine step take at least `seconds`, so a request is reliably still running."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow


def wait_until(cond, timeout: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.01)
    return cond()
