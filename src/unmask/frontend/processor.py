"""Text in -> a request the engine core can run: prompt healing, the canvas layout (chat template,
fill-in-the-middle), parameter resolution against the model's defaults, stop ids."""
from __future__ import annotations

import secrets

from ..engine.request import Request
from ..errors import UserError
from .healing import ASCII_WHITESPACE, HealMasks, split_trailing_whitespace
from .output import TextStream
from .params import SamplingParams, resolve
from .prompt import is_chat, layout_prompt
from ..structured.formats import parse_response_format
from .tools import chat_for_model, output_format, parse_tools
from ..structured.state import compile_format


class InputProcessor:
    def __init__(self, model, *, needs_prompt: bool, lookahead: bool):
        """needs_prompt: the decode plan scores a position from the one before it (an empty prompt is
        refused); lookahead: greedy requests may carry lookahead rows."""
        self.model, self.needs_prompt, self.lookahead = model, needs_prompt, lookahead
        self._heal_masks = HealMasks(model.tokenizer, model.config.vocab_size, model.device)

    def process(self, prompt, params: SamplingParams | None, request_id: str) -> tuple[Request, TextStream]:
        """Validate and lay out one request; raises UserError if it is bad."""
        model = self.model
        params = params or SamplingParams()
        ws = ""
        fmt = parse_response_format(params.response_format)
        kwargs = None
        if is_chat(prompt):
            tools = parse_tools(params.tools, params.tool_choice, params.parallel_tool_calls)
            prompt, kwargs = chat_for_model(model, list(prompt), tools)
            if tools is not None:
                if fmt is not None:
                    raise UserError("response_format and tools together are not supported; send one of them")
                fmt = output_format(tools, model.tokenizer)
        elif params.tools or params.tool_choice not in (None, "none", "auto"):
            raise UserError("tools need a chat prompt (a list of messages)")
        # A constrained output starts where the grammar says: no healing (its first token would be
        # whitespace the grammar may not allow).
        if params.heal and fmt is None and isinstance(prompt, str):  # token ids and chats are taken as given
            prompt, ws = split_trailing_whitespace(prompt, ASCII_WHITESPACE)
        head, tail = layout_prompt(model, prompt, params.suffix, kwargs)
        s = resolve(model, params, len(head) + len(tail))
        if self.needs_prompt and not head:
            raise UserError("the prompt is empty; this model scores each position from the one before it, "
                            "so it needs at least one prompt token")
        # A sampling request without a seed gets one now, so that a preempted request restarts with
        # the same randomness and its already-streamed text stays valid.
        seed = params.seed if params.seed is not None or s.temperature == 0 else secrets.randbits(63)
        stop_ids = self.stop_ids(chat=is_chat(prompt))
        heal_mask = self._heal_masks(ws) if ws else None
        if heal_mask is None and ws:  # no token fits (not with a byte-level BPE): send it as given
            head, tail = layout_prompt(model, prompt + ws, params.suffix)
            s, ws = resolve(model, params, len(head) + len(tail)), ""
        constraint = compile_format(model, fmt, s.max_tokens) if fmt is not None else None
        req = Request(request_id, head, tail, s, seed, params.stream_canvas, stop_ids,
                      heal=ws, heal_mask=heal_mask, lookahead=self.lookahead and s.temperature == 0 and fmt is None,
                      constraint=constraint)
        return req, TextStream(model.tokenizer, ws, s.stop)

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """EOS; a chat turn also ends at the tokenizer's end-of-turn token and at the other end ids a
        family's generation_config.json lists (HFTokenizer.stop_ids)."""
        tok = self.model.tokenizer
        ids = {self.model.config.eos_token_id}
        if chat:
            ids |= {t for t in (getattr(tok, "end_id", None), *getattr(tok, "stop_ids", ())) if t is not None}
        return frozenset(ids)
