"""Where the blocks are and how many tokens each step commits: plain integer arithmetic, shared by
the reference sampler and the engine so that both make exactly the same choices."""
from __future__ import annotations


def block_spans(start: int, end: int, block_size: int) -> list[tuple[int, int]]:
    """The generated region [start, end) cut at absolute multiples of `block_size`.

    Blocks are aligned to canvas position 0 (the first prompt token), as the block-causal model was
    trained, so the first span may be only the tail of the block the prompt ends in.
    >>> block_spans(5, 20, 8)
    [(5, 8), (8, 16), (16, 20)]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    spans = []
    s = start
    while s < end:
        e = min(end, (s // block_size + 1) * block_size)
        spans.append((s, e))
        s = e
    return spans


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split the integer `total` in proportion to `weights` (largest remainder; equal remainders go
    to the earlier entry). The parts sum to `total`, and none exceeds its weight when
    `total <= sum(weights)`."""
    w_sum = sum(weights)
    if total == 0 or w_sum == 0:
        return [0] * len(weights)
    base = [total * w // w_sum for w in weights]
    rem = [total * w % w_sum for w in weights]
    left = total - sum(base)
    for i in sorted(range(len(weights)), key=lambda i: (-rem[i], i))[:left]:
        base[i] += 1
    return base


def steps_per_block(masked: list[int], steps: int) -> list[int]:
    """How many steps each block gets, out of `steps` for the whole generation.

    Every block gets one step; the remaining `steps - n_blocks` are shared in proportion to the
    masks each block has beyond its first (`apportion`). So the counts sum to `steps`, each lies in
    [1, masked], and `steps == sum(masked)` gives every block one step per mask. Asking for more
    steps than masks is the same as asking for one per mask; fewer steps than blocks still gives
    each block its one step.
    >>> steps_per_block([3, 8, 8], 10)
    [2, 4, 4]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if any(m < 1 for m in masked):
        raise ValueError(f"every block needs at least one mask, got {masked}")
    n = len(masked)
    steps = min(steps, sum(masked))
    if steps <= n:
        return [1] * n
    extra = apportion(steps - n, [m - 1 for m in masked])
    return [1 + x for x in extra]


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    """Spread a block's `n_masked` masks evenly over `steps` steps; the first steps take the
    remainder (LLaDA). Steps beyond `n_masked` would commit nothing, so `steps` is capped there.
    >>> num_transfer_tokens(10, 4)
    [3, 3, 2, 2]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, n_masked) if n_masked > 0 else 1
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]
