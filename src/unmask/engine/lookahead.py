"""Moved to `unmask.decode.lookahead` (extra rows are the block plan's); kept as an alias."""
from ..decode.lookahead import key_end, lookahead_row, take_lookahead  # noqa: F401
