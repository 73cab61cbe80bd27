"""Rotary position embeddings: the frequency tables (with the context-extension scalings that Hugging
Face configs declare as `rope_scaling`) and their application to queries and keys.

Pairing is rotate-half (dimension j is rotated with j + rotary_dim/2), never interleaved. With a
partial rotary width only the first `rotary_dim` dimensions of each head are rotated; the rest pass
through unchanged.

Scalings (`RopeScaling.type`):
- `linear` (position interpolation): every inverse frequency divided by `factor`, the same as
  feeding positions / factor.
- `dynamic` (NTK-aware): the base grows with the sequence length once it exceeds the original
  context, `base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))`. Hugging Face recomputes it
  on every call from the current length; a table (and an exact KV cache) needs one length, so we
  use `max_seq_len`. With `max_seq_len` at the original context (what the family configs give) it
  is a no-op, exactly as Hugging Face up to that length.
- `llama3` (Llama 3.1+): wavelengths shorter than `original / high_freq_factor` are kept, longer than
  `original / low_freq_factor` divided by `factor`, and those between blended linearly in
  `original / wavelength`.
- `yarn`: a per-frequency blend of interpolation (`inv_freq / factor`) and extrapolation
  (`inv_freq`) with a linear ramp between the correction dimensions of `beta_fast` and `beta_slow`
  rotations over the original context, and an attention scale (`0.1 * ln(factor) + 1` unless the
  config gives one) multiplied into cos and sin.
"""
from __future__ import annotations

import math

import torch

from ..config import RopeScaling


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, theta: float, context: int) -> float:
    """The (fractional) dimension index whose wavelength fits `rotations` times into `context`."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def inv_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(rotary_dim / 2,) float64 inverse frequencies and the attention scale for cos/sin.

    seq_len: the length the table serves (only `dynamic` reads it; default: no extension).
    """
    if scaling is None:
        return _base_inv_freq(rotary_dim, theta), 1.0
    f = scaling.factor
    original = scaling.original_max_position_embeddings or seq_len or 0
    if scaling.type == "linear":
        return _base_inv_freq(rotary_dim, theta) / f, 1.0
    if scaling.type == "llama3":
        inv = _base_inv_freq(rotary_dim, theta)
        wavelen = 2 * math.pi / inv
        low, high = original / scaling.low_freq_factor, original / scaling.high_freq_factor
        smooth = ((original / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
        blended = (1 - smooth) * inv / f + smooth * inv
        return torch.where(wavelen < high, inv, torch.where(wavelen > low, inv / f, blended)), 1.0
    if scaling.type == "dynamic":
        if seq_len is None or seq_len <= original:
            return _base_inv_freq(rotary_dim, theta), 1.0
        base = theta * (f * seq_len / original - (f - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _base_inv_freq(rotary_dim, base), 1.0
    # yarn
    if scaling.attention_factor is not None:
        attn = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attn = _yarn_mscale(f, scaling.mscale) / _yarn_mscale(f, scaling.mscale_all_dim)
    else:
        attn = _yarn_mscale(f)
    extrapolated = _base_inv_freq(rotary_dim, theta)
    interpolated = extrapolated / f
    lo = _yarn_correction_dim(scaling.beta_fast, rotary_dim, theta, original)
    hi = _yarn_correction_dim(scaling.beta_slow, rotary_dim, theta, original)
    if scaling.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: high frequency, kept as is (extrapolated); 0: low frequency, interpolated
    return interpolated * (1 - keep) + extrapolated * keep, attn


def rope_tables(head_dim: int, max_len: int, theta: float, rotary_dim: int | None = None,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_len, rotary_dim / 2) float32, attention scale included.

    With the defaults (full rotary width, no scaling) these are the tables every unmask model has
    always used, bit for bit.
    """
    dim = rotary_dim or head_dim
    inv_freq, attn = inv_frequencies(dim, theta, scaling, max_len)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    if attn == 1.0:
        return angles.cos().float(), angles.sin().float()
    return (angles.cos() * attn).float(), (angles.sin() * attn).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, R/2) with R <= D. The first R dims of each head are
    rotated (pairs in the two halves of that slice), the other D - R pass through."""
    r = 2 * cos.shape[-1]
    rot = x if r == x.shape[-1] else x[..., :r]
    x1, x2 = rot.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)
    return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], dim=-1)
