"""Moved to `unmask.frontend.prompt` (text in is the frontend's job); kept as an alias."""
from ..frontend.prompt import PROMPT_KINDS, encode_prompt, is_chat, layout_prompt  # noqa: F401
