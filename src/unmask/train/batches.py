"""Deterministic training batches: every batch is a pure function of (seed, step).

Because nothing about the data stream lives in process state, a resumed run sees exactly the batches
an uninterrupted one would, and every rank can draw the same global batch and keep its own slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion import Noise, draw_noise


def window_batch(tokens: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


@dataclass(frozen=True)
class FimSpec:
    """How windows are rearranged for fill-in-the-middle.

    layout: "psm" (prefix-suffix-middle) `<fim_prefix> p <fim_suffix> s <fim_middle> m`, or "spm"
        `<fim_suffix> s <fim_prefix> p m`: the prefix sits right before the middle, so writing the
        middle is plain continuation and the model only has to learn, from the suffix, where to stop.

    end_id: a token appended after the middle (the tokenizer's EOS), so that a model learns where an
        infill stops and that the middle must lead into the suffix. None keeps version 3's layout, in
        which the middle ran to the end of the window and no model could tell when to stop.
    line_starts: per vocabulary id, whether the token begins with a newline. With it, a share
        `line_rate` of the FIM windows are cut at line starts, so the middle is 1..max_lines whole lines,
        each beginning with its newline token (the shape of a healed single-line infill request).
    """
    prefix_id: int
    suffix_id: int
    middle_id: int
    end_id: int | None = None
    line_starts: np.ndarray | None = None
    line_rate: float = 0.0
    max_lines: int = 3
    layout: str = "psm"

    @property
    def n_markers(self) -> int:
        return (3 if self.layout == "psm" else 2) + (self.end_id is not None)

    def arrange(self, prefix: torch.Tensor, middle: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        def ids(*xs: int) -> torch.Tensor:
            return torch.tensor(xs, dtype=prefix.dtype)

        end = ids() if self.end_id is None else ids(self.end_id)
        if self.layout == "spm":
            return torch.cat([ids(self.suffix_id), suffix, ids(self.prefix_id), prefix, middle, end])
        return torch.cat([ids(self.prefix_id), prefix, ids(self.suffix_id), suffix, ids(self.middle_id), middle, end])


def _line_cut(x: np.ndarray, starts: np.ndarray, rng: np.random.Generator, max_lines: int) -> tuple[int, int] | None:
    pos = np.flatnonzero(starts[x])
    pos = pos[pos > 0]  # a middle that starts the window would leave an empty prefix
    if len(pos) < 2:
        return None
    k = int(rng.integers(0, len(pos) - 1))
    n = int(rng.integers(1, max_lines + 1))
    return int(pos[k]), int(pos[min(k + n, len(pos) - 1)])


def apply_fim(x0: torch.Tensor, rate: float, rng: np.random.Generator, spec: FimSpec) -> torch.Tensor:
    """Rearrange a share `rate` of the windows for FIM, keeping their length.

    A chosen window x (length L) loses its last m tokens to the m markers, is cut at two points
    i <= j into prefix x[:i], middle x[i:j] and suffix x[j:L-m], and is laid out as `spec.layout`
    says, the layout the samplers give a block or causal model for fill-in-the-middle. Cuts are
    uniform, or at line starts for a share `spec.line_rate` of the chosen windows.
    """
    if rate <= 0:
        return x0
    B, L = x0.shape
    m = spec.n_markers
    chosen = rng.random(B) < rate
    cuts = np.sort(rng.integers(0, L - m + 1, size=(B, 2)), axis=1)  # 0 <= i <= j <= L - m
    by_line = rng.random(B) < spec.line_rate if spec.line_starts is not None and spec.line_rate > 0 else None
    out = x0.clone()
    for b in np.flatnonzero(chosen):
        x = x0[b, : L - m]
        i, j = int(cuts[b, 0]), int(cuts[b, 1])
        if by_line is not None and by_line[b]:
            i, j = _line_cut(x.numpy(), spec.line_starts, rng, spec.max_lines) or (i, j)
        out[b] = spec.arrange(x[:i], x[i:j], x[j:])
    return out


def global_batch(tokens: np.ndarray, seq_len: int, batch: int, seed: int, step: int, objective: str,
                 block_size: int, eps: float, antithetic: bool, fim_rate: float = 0.0,
                 fim: FimSpec | None = None) -> tuple[torch.Tensor, Noise | None]:
    """fim: the marker ids and cut rules, needed when fim_rate > 0."""
    rng = np.random.default_rng([seed, step])
    x0 = window_batch(tokens, seq_len, batch, rng)
    if fim_rate > 0:
        # A separate stream, so that turning FIM on leaves the windows and the noise unchanged.
        x0 = apply_fim(x0, fim_rate, np.random.default_rng([seed, step, 1]), fim)
    if objective == "ar":
        return x0, None
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    noise = draw_noise(batch, seq_len, g, block_size=block_size if objective == "bd3lm" else None,
                       eps=eps, antithetic=antithetic)
    return x0, noise


def eval_batches(tokens: np.ndarray, seq_len: int, batch: int, n_batches: int, seed: int, objective: str,
                 block_size: int, eps: float = 1e-3):
    """A fixed set of held-out windows and noise, so successive evaluations are comparable."""
    for i in range(n_batches):
        yield global_batch(tokens, seq_len, batch, seed + 1_000_003, i, objective, block_size, eps, True)
