"""A learned commit rule (the `learned` policy): a small classifier over each masked position's
features that predicts whether the token proposed there now is the one the model finally writes
(Learn2PD's idea: learn when a parallel commit is safe instead of fixing a confidence threshold).

Features are computed per row from the step's `Proposal` and its masked positions only, so a row's
score never depends on the other rows of the batch (batch-invariant, like every policy):

  confidence, log confidence, margin, entropy,         the position's own distribution
  masked positions in the row / 8, rank by confidence   how much of the block is still open
  (0 = most confident, 1 = least), leftmost open flag,
  left neighbour committed, its confidence if open,     what is next to it (outside the window: the
  right neighbour open, its confidence if open          clean prefix on the left, the unwritten
                                                        future on the right)

The classifier is an MLP (standardised features -> tanh hidden layer -> logit), trained by
`unmask commit-rule` (train/commit_rule.py) and stored beside the model as commit_rule.safetensors
(weights) and commit_rule.json (what it was trained on, how it scored).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FEATURES = ("confidence", "log_confidence", "margin", "entropy", "open_fraction", "confidence_rank", "leftmost",
            "left_committed", "left_confidence", "right_open", "right_confidence")
WEIGHTS, CARD = "commit_rule.safetensors", "commit_rule.json"
_TENSORS = ("mean", "std", "w1", "b1", "w2", "b2")


def features(confidence: torch.Tensor, margin: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor
             ) -> torch.Tensor:
    """(B, T, len(FEATURES)) float64; rows are independent. Values at unmasked positions are defined
    but meaningless."""
    c = confidence.to(torch.float64)
    B, T = masked.shape
    m = masked.to(torch.float64)
    n = m.sum(-1, keepdim=True)
    # rank among the row's open positions by descending confidence (ties to the lower position)
    key = torch.where(masked, c, torch.full_like(c, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=c.device).expand(B, T))
    rank = rank.to(torch.float64) / (n - 1).clamp(min=1)
    leftmost = (masked & (masked.to(torch.int64).cumsum(-1) == 1)).to(torch.float64)
    one, zero = torch.ones(B, 1, dtype=torch.float64, device=c.device), torch.zeros(B, 1, dtype=torch.float64,
                                                                                    device=c.device)
    left_open = torch.cat([zero, m[:, :-1]], -1)
    left_conf = torch.where(left_open > 0, torch.cat([one, c[:, :-1]], -1), 1.0)
    right_open = torch.cat([m[:, 1:], one], -1)
    right_conf = torch.where(right_open > 0, torch.cat([c[:, 1:], zero], -1), 1.0)
    cols = [c, c.clamp(min=1e-9).log(), margin.to(torch.float64), entropy.to(torch.float64), (n / 8).expand(B, T),
            rank, leftmost, 1 - left_open, left_conf, right_open, right_conf]
    return torch.stack(cols, -1)


@dataclass
class CommitRule:
    """p(proposal == final token) from features; float64 throughout (tiny, and the same on any device)."""

    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    w1: torch.Tensor  # (F, H)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (H,)
    b2: torch.Tensor  # ()
    info: dict

    @classmethod
    def init(cls, hidden: int = 32, seed: int = 0) -> "CommitRule":
        g = torch.Generator().manual_seed(seed)
        F = len(FEATURES)
        return cls(torch.zeros(F, dtype=torch.float64), torch.ones(F, dtype=torch.float64),
                   torch.randn(F, hidden, generator=g, dtype=torch.float64) / F ** 0.5,
                   torch.zeros(hidden, dtype=torch.float64),
                   torch.randn(hidden, generator=g, dtype=torch.float64) / hidden ** 0.5,
                   torch.zeros((), dtype=torch.float64), {})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _TENSORS}

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(((x - self.mean) / self.std) @ self.w1 + self.b1)
        return h @ self.w2 + self.b2

    def score(self, confidence, margin, entropy, masked) -> torch.Tensor:
        """(B, T) float64 in (0, 1): the predicted chance that each proposal is final."""
        x = features(confidence, margin, entropy, masked)
        dev = x.device
        t = {k: v.to(dev) for k, v in self.tensors().items()}
        h = torch.tanh(((x - t["mean"]) / t["std"]) @ t["w1"] + t["b1"])
        return torch.sigmoid(h @ t["w2"] + t["b2"])

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save

        from ..fsutil import atomic_open, atomic_write_text

        d = Path(directory)
        with atomic_open(d / WEIGHTS, "wb") as f:
            f.write(save({k: v.detach().contiguous() for k, v in self.tensors().items()}))
        atomic_write_text(d / CARD, json.dumps({"features": list(FEATURES), **self.info}, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "CommitRule | None":
        """The rule stored in a model directory, or None when it has none."""
        from safetensors.torch import load_file

        from ..errors import UserError

        d = Path(directory)
        if not (d / WEIGHTS).is_file():
            return None
        try:
            t = load_file(d / WEIGHTS)
            info = json.loads((d / CARD).read_text(encoding="utf-8")) if (d / CARD).is_file() else {}
        except Exception as e:  # noqa: BLE001 (any parse failure is the same user error)
            raise UserError(f"{d / WEIGHTS}: unreadable ({e}); retrain it with `unmask commit-rule --model {d}`") from None
        if set(t) != set(_TENSORS) or info.get("features", list(FEATURES)) != list(FEATURES) \
                or t["w1"].shape[0] != len(FEATURES):
            raise UserError(f"{d / WEIGHTS}: not a commit rule of this version (features {info.get('features')}); "
                            f"retrain it with `unmask commit-rule --model {d}`")
        return cls(**{k: t[k].to(torch.float64) for k in _TENSORS}, info=info)

