"""Held-out bits per byte: the ELBO for diffusion models (an upper bound on NLL), exact NLL for AR.

Per-token figures depend on the tokenizer; bits per byte does not, so it is what we compare.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..diffusion import compute_loss, get_schedule


@torch.no_grad()
def bits_per_byte(net, tokens: np.ndarray, bytes_per_token: float, *, seq_len: int, batch: int = 8,
                  n_batches: int = 8, seed: int = 0, schedule: str = "linear", eps: float = 1e-3,
                  device="cpu") -> dict:
    from ..train.batches import eval_batches

    cfg = net.config
    was_training = net.training
    net.eval()
    nll, count = 0.0, 0
    for x0, noise in eval_batches(tokens, seq_len, batch, n_batches, seed, cfg.objective, cfg.block_size, eps):
        out = compute_loss(cfg.objective, net, x0.to(device), None if noise is None else noise.to(device),
                           get_schedule(schedule), cfg.mask_token_id, cfg.block_size)
        nll += float(out.nll)
        count += out.tokens
    net.train(was_training)
    nats = nll / max(count, 1)
    return {"nats_per_token": nats, "bpb": nats / math.log(2) / bytes_per_token, "tokens": count}
