"""Logit penalties against repetition, per request, applied to a step's logits before proposals.

  repetition_penalty r (CTRL, as Hugging Face applies it): for every token in the prompt or the
      output so far, a positive logit is divided by r and a negative one multiplied by r;
  presence_penalty p, frequency_penalty f (OpenAI): logit -= p * [token in the output] + f * count.

"The output so far" of a diffusion request is what it has committed, wherever on the canvas; still
masked positions and stop tokens (EOS a request may commit early as filler) count for nothing. Rows without penalties are not touched, so their tokens are the
same as without this stage.
"""
from __future__ import annotations

import torch


def penalise(logits: torch.Tensor, rows, mask_id: int) -> torch.Tensor:
    """logits (B, A, V) with each penalised row's penalties applied (a float32 copy when any is)."""
    todo = [i for i, r in enumerate(rows) if r.s.penalised]
    if not todo:
        return logits
    out = logits.float().clone()
    V = out.shape[-1]
    for i in todo:
        r, s = rows[i], rows[i].s
        gen = r.canvas[r.lo:r.hi]
        gen = gen[(gen != mask_id) & (gen >= 0) & (gen < V)]
        if r.stop_ids:  # EOS filler a diffusion request commits early is not "output" to penalise
            gen = gen[~torch.isin(gen, torch.tensor(sorted(r.stop_ids), dtype=gen.dtype))]
        counts = torch.bincount(gen, minlength=V)[:V].to(out.device, out.dtype)
        row = out[i]
        if s.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = torch.tensor([t for t in r.head + r.tail if 0 <= t < V], dtype=torch.long)
            seen[prompt.to(seen.device)] = True
            x = row[:, seen]
            row[:, seen] = torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)
        if s.presence_penalty or s.frequency_penalty:
            row -= s.presence_penalty * (counts > 0).to(out.dtype) + s.frequency_penalty * counts
    return out
