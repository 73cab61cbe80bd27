"""Templates with holes: the caller gives the canvas itself, fixed text spans and holes, and the
model fills the holes (any-order infilling).

    template = ["def area(r):\\n    \\"\\"\\"", Hole(16), "\\"\\"\\"\\n    return ", Hole(12), "\\n"]

What a model sees while it fills a hole depends on how it attends (docs/templates.md):

  full attention (LLaDA, Dream, MDLM)   one canvas: prompt, fixed spans and every hole's masks; all
                                        holes decode together, each seeing everything on both sides
  block-causal / causal with FIM tokens the holes one after another, left to right: hole i is a
                                        fill-in-the-middle request whose prefix is everything before
                                        it (prompt, fixed spans, earlier holes as filled) and whose
                                        suffix is the fixed span right after it, up to the next hole
  block-causal / causal without them    the same chain with no suffix: only what is before the hole

A hole ends at its budget (`max_tokens`) or where the model writes a stop token (EOS), which is
stripped. Fixed spans are never changed. The engine core sees token ids only: this module lays the
canvas out and reads the filled holes back.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..structured.formats import FormatError

MODES = ("canvas", "chain")


@dataclass(frozen=True)
class Hole:
    """A gap of at most `max_tokens` tokens for the model to fill."""

    max_tokens: int


@dataclass
class FilledHole:
    """What the model wrote in one hole."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": the model ended the hole; "length": it used the whole budget


def parse_template(template) -> tuple[str | Hole, ...]:
    """A template's segments, checked: a list whose items are text (a string, or {"text": s}) and
    holes (a `Hole`, or {"hole": max_tokens}); at least one hole, no two holes in a row."""
    if isinstance(template, (str, bytes)) or not isinstance(template, (list, tuple)) or not template:
        raise UserError("template must be a non-empty list of text spans (strings) and holes "
                        "({\"hole\": max_tokens}); see docs/templates.md")
    out: list[str | Hole] = []
    for i, item in enumerate(template):
        seg = _segment(i, item)
        if isinstance(seg, str):
            if not seg:
                continue
            if out and isinstance(out[-1], str):  # two text spans in a row are one span
                out[-1] += seg
                continue
        elif out and isinstance(out[-1], Hole):
            raise UserError(f"template[{i}]: two holes in a row; merge them into one hole of their total budget")
        out.append(seg)
    if not any(isinstance(s, Hole) for s in out):
        raise UserError("template has no hole ({\"hole\": max_tokens}); with nothing to fill, send a plain prompt")
    return tuple(out)


def _segment(i: int, item) -> str | Hole:
    if isinstance(item, str):
        return item
    if isinstance(item, Hole):
        n = item.max_tokens
    elif isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
        return item["text"]
    elif isinstance(item, dict) and set(item) == {"hole"}:
        n = item["hole"]
    else:
        raise UserError(f"template[{i}]: each item is a text span (a string or {{\"text\": ...}}) or a hole "
                        f"({{\"hole\": max_tokens}}); got {item!r:.80}")
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise UserError(f"template[{i}]: a hole's budget must be an integer number of tokens, got {n!r}") from None
    if n < 1:
        raise UserError(f"template[{i}]: a hole's budget must be at least 1 token, got {n}")
    return Hole(n)


def template_mode(model) -> str:
    """"canvas" (one canvas, every hole sees both sides) for full attention; else "chain"."""
    return "canvas" if model.config.attention == "full" else "chain"


@dataclass
class TemplateJob:
    """One template request: its segments as token ids, and the holes filled so far (chain mode)."""

    segments: tuple[str | Hole, ...]
    prompt: str
    mode: str
    fixed: list[list[int] | None]  # per segment: the text span's ids (None for a hole)
    fills: list[str] = field(default_factory=list)  # chain: each finished hole's text
    fill_ids: list[list[int]] = field(default_factory=list)  # and its token ids
    finish: list[str] = field(default_factory=list)  # chain: "stop" (the model ended it) or "length"
    # what the finished sub-requests of a chain add to the output's counters
    nfe: int = 0
    prompt_tokens: int = 0
    preemptions: int = 0
    arrival: float | None = None
    params: object = None  # the request's SamplingParams, less the template (frontend/processor.py)
    formats: list = field(default_factory=list)  # per hole: an OutputFormat its text must match, or None
    chat: bool = False  # the prompt is a rendered chat (token ids; a turn also ends at end-of-turn)
    seed: int | None = None
    need: int = 0  # an upper bound on the tokens any one of its requests holds (frontend/processor.py)

    @classmethod
    def build(cls, model, prompt, template) -> TemplateJob:
        if not isinstance(prompt, str):
            raise UserError("prompt must be text with a template (the text before it; it may be empty), "
                            "not token ids or a chat")
        segments = parse_template(template)
        tok = model.tokenizer
        fixed = [None if isinstance(s, Hole) else list(tok.encode(s, allow_special=False)) for s in segments]
        return cls(segments, prompt, template_mode(model), fixed, formats=[None] * sum(f is None for f in fixed))

    @classmethod
    def from_format(cls, model, prompt, fmt, max_tokens: int | None, chat: bool) -> TemplateJob:
        """A json_schema of fixed shape laid out by its keys (structured/layout.py). The budget
        (max_tokens, or the model's default) less the keys' tokens is shared by the values: each
        gets the shortest output of its schema, and the rest in equal parts."""
        from ..sampling.schedule import apportion
        from ..structured.layout import schema_template
        from ..structured.state import compile_format

        spans, formats = schema_template(fmt)
        tok = model.tokenizer
        fixed = [None if s is None else list(tok.encode(s, allow_special=False)) for s in spans]
        budget = (max_tokens if max_tokens is not None else model.generation.max_tokens) \
            - sum(len(f) for f in fixed if f is not None)
        needs = [compile_format(model, f, 1 << 20).need() for f in formats]
        if budget < sum(needs):
            raise FormatError(f"max_tokens is {budget + sum(len(f) for f in fixed if f is not None)} but the schema laid "
                              f"out by its keys needs at least {sum(needs) + sum(len(f) for f in fixed if f is not None)} "
                              "tokens; raise max_tokens")
        extra = apportion(budget - sum(needs), [1] * len(needs))
        holes = iter(Hole(n + x) for n, x in zip(needs, extra))
        segments = tuple(next(holes) if s is None else s for s in spans)
        return cls(segments, prompt, template_mode(model), fixed, formats=formats, chat=chat)

    def head(self, tokenizer, vocab_size: int) -> list[int]:
        """The prompt's ids (a rendered chat is given as ids already)."""
        if isinstance(self.prompt, str):
            return list(tokenizer.encode(self.prompt, allow_special=False))
        return list(self.prompt)

    @property
    def budgets(self) -> list[int]:
        return [s.max_tokens for s in self.segments if isinstance(s, Hole)]

    def region(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Canvas mode: the generated region (fixed ids, -1 at hole positions) and each hole's span
        in it."""
        region, holes = [], []
        for seg, ids in zip(self.segments, self.fixed):
            if ids is None:
                holes.append((len(region), len(region) + seg.max_tokens))
                region += [-1] * seg.max_tokens
            else:
                region += ids
        return region, holes

    def hole_segment(self, k: int) -> int:
        """The index among the segments of the k-th hole."""
        return [i for i, s in enumerate(self.segments) if isinstance(s, Hole)][k]

    # ---- chain mode --------------------------------------------------------------------------------
    @property
    def current(self) -> int:
        """The hole being filled (chain mode)."""
        return len(self.fills)

    def plan_chain(self, tokenizer, heal) -> None:
        """Chain mode: the ids of the text before each hole (the prompt and the spans before the
        first; the span between two holes after that), without the trailing whitespace `heal(text)`
        takes off (prompt healing: the model rewrites it, and the hole's text is taken relative to
        it), and of the span after each hole (its suffix). A hole's prompt is built from these ids and
        the earlier holes' own ids, so no text is tokenised twice and `need` is exact."""
        self.pieces, self.suffixes, self.heals = [], [], []
        text = self.prompt if isinstance(self.prompt, str) else ""
        ids = [] if isinstance(self.prompt, str) else list(self.prompt)  # a rendered chat
        segs = list(self.segments)
        for i, seg in enumerate(segs):
            if isinstance(seg, str):
                text += seg
                continue
            kept, ws = heal(text)
            self.pieces.append(ids + (list(tokenizer.encode(kept, allow_special=False)) if kept else []))
            ids = []
            self.heals.append(ws)
            after = segs[i + 1] if i + 1 < len(segs) else ""
            self.suffixes.append(list(tokenizer.encode(after, allow_special=False)) if after else [])
            text = ""
        budgets, need, held = self.budgets, 0, 0
        for k in range(len(budgets)):
            held += len(self.pieces[k]) + (budgets[k - 1] if k else 0)
            need = max(need, held + len(self.suffixes[k]) + budgets[k] + 3)
        self.need = need

    def chain_prompt(self) -> tuple[list[int], list[int], str, int]:
        """The next hole's request: (prefix ids, suffix ids, the whitespace healed off, budget)."""
        k = self.current
        prefix = []
        for j in range(k):
            prefix += self.pieces[j] + self.fill_ids[j]
        prefix += self.pieces[k]
        return prefix, self.suffixes[k], self.heals[k], self.budgets[k]

    def record(self, ids: list[int], text: str, reason: str) -> None:
        self.fill_ids.append(list(ids))
        self.fills.append(text)
        self.finish.append(reason)

    def done(self) -> bool:
        return len(self.fills) == len(self.budgets)

    # ---- reading the output --------------------------------------------------------------------
    def holes_of(self, r, tokenizer) -> tuple[list[list[int]], list[str], list[str]]:
        """(each hole's ids so far, its text so far, each finished hole's reason) with `r` the request
        now running (None once a chain is done). A hole stops at its first stop token (stripped) or
        before its first still-masked position; the list of reasons stops at the first open hole."""
        if self.mode == "chain":
            ids, texts, finish = [list(f) for f in self.fill_ids], list(self.fills), list(self.finish)
            if r is not None and not self.done():
                part, _ = r.committed_prefix()
                ids.append(part)
                texts.append(r.text_of(tokenizer.decode(part, skip_special=True)))
            return ids, texts, finish
        _, spans = self.region()
        gen = r.canvas[r.lo:r.hi].tolist()
        if r.s.remask > 0 and r.finish_reason is None and r.span_idx < len(r.spans):
            b0 = r.block[0] - r.lo  # the block being decoded may still be revised: not final yet
            gen = gen[:b0] + [r.mask_id] * (len(gen) - b0)
        ids, finish, open_ = [], [], False
        for a, b in spans:
            hole, reason = [], "length"
            for t in gen[a:b]:
                if t in r.stop_ids:
                    reason = "stop"
                    break
                if t == r.mask_id:
                    reason = None
                    break
                hole.append(t)
            ids.append(hole)
            open_ = open_ or reason is None
            if not open_:
                finish.append(reason)
        return ids, [tokenizer.decode(h, skip_special=True) for h in ids], finish

    def visible(self, r, tokenizer) -> str:
        """The output text that will not change: the template in order, up to the first hole still
        open (with what of it is known)."""
        _, texts, finish = self.holes_of(r, tokenizer)
        out, k = [], 0
        for seg in self.segments:
            if isinstance(seg, str):
                out.append(seg)
                continue
            out.append(texts[k] if k < len(texts) else "")
            if k >= len(finish):  # this hole is still open: nothing after it is final
                break
            k += 1
        return "".join(out)

    def canvas(self, r, mask_id: int) -> tuple[list[int], int, list[tuple[int, int]]]:
        """The whole template as a canvas for a `diffusing` stream, the offset of the running request's
        generated region in it, and each hole's span. Chain mode: finished holes as written, the
        current hole's canvas in place, masks for the holes to come."""
        if self.mode == "canvas":
            return r.generated(), 0, self.region()[1]
        out, spans, k, offset = [], [], 0, 0
        for seg, ids in zip(self.segments, self.fixed):
            if ids is not None:
                out += ids
                continue
            start = len(out)
            if k < len(self.fills):
                out += self.fill_ids[k]
            elif k == len(self.fills) and r is not None:
                offset = len(out)
                out += r.generated()
            else:
                out += [mask_id] * seg.max_tokens
            spans.append((start, len(out)))
            k += 1
        return out, offset, spans


def close_holes(r) -> list[int]:
    """Canvas mode: a hole in which the model wrote a stop token ends there; its masked positions
    after that token are filled with it (so they are not decoded). The positions written, relative
    to the generated region."""
    written = []
    for a, b in r.holes:
        seg = r.canvas[a:b]
        stops = torch.isin(seg, torch.tensor(sorted(r.stop_ids)))
        if not bool(stops.any()):
            continue
        p = int(stops.nonzero()[0])
        rest = (seg[p + 1:] == r.mask_id).nonzero().flatten() + p + 1
        if len(rest):
            r.canvas[a + rest] = int(seg[p])
            written += (a + rest - r.lo).tolist()
    return written


MARKER = re.compile(r"\{\{hole:(\d+)\}\}")


def from_marked(text: str) -> list[str | Hole]:
    """The CLI's template syntax: text in which `{{hole:N}}` marks a hole of N tokens.
    >>> from_marked("def f(x):\\n    return {{hole:8}}\\n")
    ['def f(x):\\n    return ', Hole(max_tokens=8), '\\n']
    """
    out: list[str | Hole] = []
    at = 0
    for m in MARKER.finditer(text):
        out += [text[at:m.start()], Hole(int(m.group(1)))]
        at = m.end()
    out.append(text[at:])
    return [s for s in out if s != ""]


def load_template(arg: str) -> list:
    """--template: a file (or the text itself) with `{{hole:N}}` markers, or a JSON list of segments."""
    import json
    from pathlib import Path

    text = Path(arg).read_text() if len(arg) < 4096 and "\n" not in arg and Path(arg).is_file() else arg
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--template looks like a JSON list but does not parse: {e}") from None
    return from_marked(text)
