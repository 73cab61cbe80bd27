"""Text in -> a request the engine core can run: prompt healing, the canvas layout (chat template,
fill-in-the-middle), parameter resolution against the model's defaults, stop ids."""
from __future__ import annotations

import dataclasses
import secrets

from ..engine.request import Request
from ..errors import UserError
from .healing import ASCII_WHITESPACE, HealMasks, split_trailing_whitespace
from .output import TextStream
from .params import SamplingParams, resolve
from .prompt import encode_prompt, fim_layout, has_fim, is_chat, layout_prompt
from .template import TemplateJob
from ..structured.formats import parse_response_format
from .tools import chat_for_model, output_format, parse_tools
from ..structured.state import compile_format


class InputProcessor:
    def __init__(self, model, *, needs_prompt: bool, lookahead: bool):
        """needs_prompt: the decode plan scores a position from the one before it (an empty prompt is
        refused); lookahead: greedy requests may carry lookahead rows."""
        self.model, self.needs_prompt, self.lookahead = model, needs_prompt, lookahead
        self._heal_masks = HealMasks(model.tokenizer, model.config.vocab_size, model.device)

    def process(self, prompt, params: SamplingParams | None, request_id: str
                ) -> tuple[Request, TextStream, TemplateJob | None]:
        """Validate and lay out one request; raises UserError if it is bad. A template (given, or a
        response_format laid out by its keys) comes with its job (frontend/template.py)."""
        model = self.model
        params = params or SamplingParams()
        if params.template is not None:
            job, req, stream = self.template(prompt, params, request_id)
            return req, stream, job
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
        if fmt is not None and fmt.layout == "keys":  # keys as text, values as holes (structured/layout.py)
            head = encode_prompt(model.tokenizer, prompt, model.config.vocab_size, kwargs) if is_chat(prompt) else prompt
            job, req, stream = self.template(head, params, request_id, fmt=fmt, chat=is_chat(prompt))
            return req, stream, job
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
        if fmt is not None and s.remask > 0:
            raise UserError("remask does not combine with response_format or tools: a constrained output is a "
                            "committed prefix the grammar has accepted, and it is never revised")
        constraint = compile_format(model, fmt, s.max_tokens) if fmt is not None else None
        req = Request(request_id, head, tail, s, seed, params.stream_canvas, stop_ids,
                      heal=ws, heal_mask=heal_mask,
                      lookahead=self.lookahead and s.temperature == 0 and fmt is None and s.remask == 0,
                      constraint=constraint)
        return req, TextStream(model.tokenizer, ws, s.stop), None

    # ---- templates with holes (frontend/template.py) ----------------------------------------------
    def template(self, prompt, params: SamplingParams, request_id: str, fmt=None, chat: bool = False
                 ) -> tuple[TemplateJob, Request, TextStream]:
        """Validate a template request; its job and the core request for its canvas (canvas mode) or
        its first hole (chain mode). fmt: a json_schema of fixed shape, laid out by its keys (the
        template is then built from it, each hole under its value's schema); prompt is then text or
        token ids (a rendered chat)."""
        for name, given in (("suffix", params.suffix is not None), ("response_format", params.response_format is not None and fmt is None),
                            ("tools", bool(params.tools)), ("stop", bool(params.stop))):
            if given:
                raise UserError(f"{name} does not combine with a template: the template's text spans are the "
                                "context, and each hole ends at its budget or the model's end of text")
        if fmt is not None and params.remask:
            raise UserError("remask does not combine with response_format: a constrained output is never revised")
        model, tok = self.model, self.model.tokenizer
        ctx = model.config.max_seq_len
        if fmt is not None:
            job = TemplateJob.from_format(model, prompt, fmt, params.max_tokens, chat)
        else:
            job = TemplateJob.build(model, prompt, params.template)
        total = sum(job.budgets)
        if params.max_tokens is not None and total > params.max_tokens:
            raise UserError(f"max_tokens is {params.max_tokens} but the template's holes ask for {total} tokens in all; "
                            "lower the holes' budgets")
        if job.mode == "canvas":
            job.need = len(job.head(tok, model.config.vocab_size)) + sum(len(f) for f in job.fixed if f is not None) \
                + total
        else:
            job.plan_chain(tok, lambda text: self._heal(text, params.heal and fmt is None))
        if job.need > ctx:
            raise UserError(f"template: the prompt, the text spans and the holes' budgets need {job.need} tokens, but "
                            f"the model's context is {ctx}; shorten the template or lower the holes' budgets")
        if job.mode == "canvas" and self.needs_prompt and not prompt and job.fixed[0] is None:
            raise UserError("template: it starts with a hole and the prompt is empty; this model scores each position "
                            "from the one before it, so give a prompt or start the template with text")
        job.params = dataclasses.replace(params, template=None, max_tokens=None, response_format=None)
        job.seed = params.seed if params.seed is not None else secrets.randbits(63)
        if job.mode == "canvas":  # its text spans are context the model reads, as a prompt is
            job.prompt_tokens = sum(len(f) for f in job.fixed if f is not None)
        return job, self.template_request(job, request_id), TextStream(tok)

    def template_request(self, job: TemplateJob, request_id: str) -> Request:
        """The core request for a template's canvas, or for the next hole of its chain."""
        model, params = self.model, job.params
        stop_ids = self.stop_ids(chat=job.chat)
        if job.mode == "canvas":
            head = job.head(model.tokenizer, model.config.vocab_size)
            region, spans = job.region()
            s = resolve(model, dataclasses.replace(params, max_tokens=len(region)), len(head))
            lo = len(head)
            formats = [None if f is None else compile_format(model, f, b) for f, b in zip(job.formats, job.budgets)]
            return Request(request_id, head, [], s, job.seed, params.stream_canvas, stop_ids,
                           region=region, holes=[(lo + a, lo + b) for a, b in spans],
                           hole_constraints=formats if any(formats) else None)
        prefix, suffix, ws, budget = job.chain_prompt()
        if has_fim(model.tokenizer):
            head, tail = fim_layout(model, prefix, suffix), []
        else:  # no fill-in-the-middle tokens: the hole sees what is before it only
            head, tail = prefix, []
        heal_mask = self._heal_masks(ws) if ws else None
        if self.needs_prompt and not head:
            raise UserError("template: it starts with a hole and the prompt is empty; this model scores each position "
                            "from the one before it, so give a prompt or start the template with text")
        s = resolve(model, dataclasses.replace(params, max_tokens=budget), len(head) + len(tail))
        seed = job.seed + job.current if s.temperature > 0 else None
        fmt = job.formats[job.current]
        return Request(request_id, head, tail, s, seed, params.stream_canvas, stop_ids, heal=ws, heal_mask=heal_mask,
                       lookahead=self.lookahead and s.temperature == 0 and s.remask == 0 and fmt is None,
                       constraint=None if fmt is None else compile_format(model, fmt, budget))

    def _heal(self, text: str, heal: bool) -> tuple[str, str]:
        """(text, "") or (text less its trailing newline-and-indentation, that whitespace) when
        healing is on and some token can start with it."""
        if not heal:
            return text, ""
        kept, ws = split_trailing_whitespace(text, ASCII_WHITESPACE)
        return (kept, ws) if ws and self._heal_masks(ws) is not None else (text, "")

    def stop_ids(self, chat: bool) -> frozenset[int]:
        """EOS; a chat turn also ends at the tokenizer's end-of-turn token and at the other end ids a
        family's generation_config.json lists (HFTokenizer.stop_ids)."""
        tok = self.model.tokenizer
        ids = {self.model.config.eos_token_id}
        if chat:
            ids |= {t for t in (getattr(tok, "end_id", None), *getattr(tok, "stop_ids", ())) if t is not None}
        return frozenset(ids)
