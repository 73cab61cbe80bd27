"""Moved to `unmask.frontend.healing` (prompt healing is text in, the frontend's job); kept as an alias."""
from ..frontend.healing import *  # noqa: F401,F403
from ..frontend.healing import ASCII_WHITESPACE, HealMasks, healed_prefix_len, split_trailing_whitespace, unheal  # noqa: F401
