"""Text in and out: prompts and chat layout, fill-in-the-middle, prompt healing, parameter
resolution (in); detokenising, stop strings, UTF-8 hold-back (out). The engine core sees token ids."""
from .output import TextStream
from .params import SamplingParams, resolve
from .prompt import encode_prompt, is_chat, layout_prompt

__all__ = ["SamplingParams", "TextStream", "encode_prompt", "is_chat", "layout_prompt", "resolve"]
