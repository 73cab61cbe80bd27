"""One request's grammar: an llguidance matcher over the tokens committed so far, plus what the
decoder asks of it (allowed tokens, forced tokens, and the shortest way it knows to finish).

The matcher consumes exactly the committed prefix of the request's output; nothing right of the
leftmost open position is ever fed to it (stage.py keeps commits contiguous for constrained rows).

Finishing within budget: `closing(path_limit)` walks the matcher forward greedily, preferring
the single characters that close what is open (`"`, `}`, `]`, `)`), then separators (`,` ends a
number and leads to the next required key), small atoms (0, 1, false, true, null), single letters
and digits, then anything short; whitespace and openers last. The length of that walk, plus one for
EOS, is what the request still needs; the stage compares it with the positions left and, when they
run out, writes the walk instead of the model's tokens, so the output is complete and valid within
max_tokens.
"""
from __future__ import annotations

import weakref

import numpy as np

from .formats import FormatError, OutputFormat, grammar_text

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
CLOSERS = set('"}])')
OPENERS = set("{[(")
SEPARATORS = (",", ":")
RECENT = 1  # a candidate leading back to one of the walk's last RECENT allowed sets is not progress
WALK_FUEL = 4000  # candidate tries one walk may spend (each a consume, a mask and a rollback)
CANDIDATES = 48  # allowed tokens a closing step tries (one per kind of first character) for progress
ATOMS = ("0", "1", "false", "true", "null")


class Vocabulary:
    """Per tokenizer: llguidance's tokenizer and the closing walk's preference order over ids."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        import llguidance

        self.ll = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_id)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        texts = tokenizer.token_texts() + [""] * max(0, vocab_size - tokenizer.vocab_size)

        def rank(i: int) -> tuple:
            t = texts[i]
            if not t or i == eos_id:
                return (9, 0, i)
            if t in CLOSERS:  # one closing character (several could open a string of them)
                return (0, 0, i)
            if t in SEPARATORS:  # what ends a number or moves on to the next required key
                return (1, SEPARATORS.index(t), i)
            if t in ATOMS:
                return (2, ATOMS.index(t), i)
            if len(t) == 1 and t.isalnum():
                return (3, 0 if t.islower() else 1, i)
            if t.isspace():
                return (6, len(t), i)
            if set(t) & OPENERS:
                return (5, len(t), i)
            return (4, len(t), i)

        self.order = np.array(sorted(range(vocab_size), key=rank), dtype=np.int64)

        def group(t: str) -> int:  # tokens starting alike lead to alike states: try one of each
            c = t[:1]
            return -1 if not c else ord("a") if c.islower() else ord("A") if c.isupper() else \
                ord("0") if c.isdigit() else ord(c)
        self.group = np.array([group(texts[i]) for i in range(vocab_size)], dtype=np.int64)

    @classmethod
    def of(cls, model) -> "Vocabulary":
        v = _TOKENIZERS.get(model.tokenizer)
        if v is None or v.vocab_size != model.config.vocab_size or v.eos_id != model.config.eos_token_id:
            v = _TOKENIZERS[model.tokenizer] = cls(model.tokenizer, model.config.vocab_size, model.config.eos_token_id)
        return v


def _forced(m) -> list[int]:
    """The matcher's fast-forward tokens that it also accepts: llguidance may spell forced bytes
    with a tokenizer's added token (Qwen's `<tool_call>`) that its own masks treat as special."""
    ff = m.compute_ff_tokens()
    return ff[: m.validate_tokens(ff)] if ff else ff


def _bits(mask: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:n].astype(bool)


class GrammarState:
    def __init__(self, vocab: Vocabulary, grammar: str):
        import llguidance

        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
        self.consumed = 0
        self._need: tuple[int, int | None] | None = None  # (consumed, need) for the current state
        self._after: tuple[int, int, int | None] | None = None  # (consumed, token, need after it)
        self._walk: tuple[int, list[int] | None] | None = None  # (consumed, closing walk) for the current state

    def reset(self) -> None:
        """Back to the start (the request was preempted and restarts from an empty canvas)."""
        self.matcher.reset()
        self.consumed = 0
        self._need = self._after = self._walk = None

    # ---- what the grammar allows -----------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """Complete, and nothing may follow but EOS."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens that may come next (EOS among them iff accepting)."""
        return _bits(self.matcher.compute_bitmask(), self.vocab.vocab_size)

    def forced(self) -> list[int]:
        """Tokens the grammar forces from here (keys, punctuation), possibly none."""
        return _forced(self.matcher)

    def valid(self, token: int) -> bool:
        if token == self.vocab.eos_id:
            return self.accepting
        return self.matcher.validate_tokens([int(token)]) == 1

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")
        after, walk = self._after, self._walk
        self._need = (self.consumed + 1, after[2]) if after is not None and after[:2] == (self.consumed, int(token)) \
            else None
        # Following the closing walk: the rest of it is the walk from the new state (so the need falls
        # by one per token and the output finishes in the positions it was promised).
        if walk is not None and walk[0] == self.consumed and walk[1] and walk[1][0] == int(token):
            self._walk = (self.consumed + 1, walk[1][1:])
            self._need = (self.consumed + 1, 1 if self.matcher.is_accepting() else len(walk[1]))
        else:
            self._walk = None
        self._after = None
        self.consumed += 1

    # ---- finishing ------------------------------------------------------------------------------
    def closing(self, limit: int = 512) -> list[int] | None:
        """The closing walk from the current state (cached; see _walk_from)."""
        if self._walk is not None and self._walk[0] == self.consumed:
            return self._walk[1]
        path = self._walk_from(self.matcher, limit)
        self._walk = (self.consumed, path)
        return path

    def _walk_from(self, matcher, limit: int = 512) -> list[int] | None:
        """The greedy walk from here to an accepting state (not including EOS); None if none is
        found within `limit` tokens. At each step it takes, in the preference order, the first
        allowed token that completes the output or leads to an allowed set not among the walk's last
        RECENT ones (a wider memory turns a closing "]" down because "]" was allowed earlier);
        failing that, the first that changes the allowed set at all (so "0" after "0" in
        `[0-9]+\\.` gives way to "."); failing that, the one the walk used least (states can differ
        with the same allowed set: "a" and " a" in `[a-z]+( [a-z]+){2}`)."""
        m = matcher.deep_copy()
        order, n, eos = self.vocab.order, self.vocab.vocab_size, self.vocab.eos_id
        fuel = WALK_FUEL
        path: list[int] = []
        recent = [m.compute_bitmask()]  # the allowed sets of the last few states of the walk
        while len(path) <= limit:
            if m.is_accepting():
                return path
            ff = _forced(m)
            if ff:
                if not m.consume_tokens(ff):
                    return None
                path += ff
                recent = (recent + [m.compute_bitmask()])[-RECENT:]
                continue
            here = m.compute_bitmask()
            ok = _bits(here, n)
            ok[eos] = False
            allowed = order[ok[order]]
            if not len(allowed):
                return None
            pick = changed = None  # the first novel candidate; the first that changes the allowed set at all
            groups, tried, reps = self.vocab.group, set(), []
            for t in allowed:
                g = groups[t]
                if g in tried:
                    continue
                tried.add(g)
                t = int(t)
                reps.append(t)
                fuel -= 1
                if fuel < 0:  # too costly a grammar to finish by search: unknown
                    return None
                if not m.consume_token(t):
                    return None
                after = m.compute_bitmask()
                done = m.is_accepting()
                m.rollback(1)
                if done or (after != here and after not in recent):
                    pick = t
                    break
                if changed is None and after != here:
                    changed = t
                if len(tried) >= CANDIDATES:
                    break
            if pick is None:
                pick = changed if changed is not None else min(reps, key=path.count)
            if not m.consume_token(pick):
                return None
            recent = (recent + [m.compute_bitmask()])[-RECENT:]
            path.append(pick)
        return None

    def need(self, limit: int = 512) -> int | None:
        """Positions this output still needs (the closing walk plus EOS); None: no walk found."""
        if self._need is not None and self._need[0] == self.consumed:
            return self._need[1]
        if self.accepting:
            value = 1
        else:
            path = self.closing(limit)
            value = None if path is None else len(path) + 1
        self._need = (self.consumed, value)
        return value

    def need_after(self, token: int) -> int | None:
        """need() once `token` is consumed (the state is left as it was; consuming `token` next
        reuses the answer)."""
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")
        m, saved, walk = self.matcher, self._need, self._walk
        self.consumed += 1
        self._need = self._walk = None
        try:
            value = self.need()
        finally:
            m.rollback(1)
            self.consumed -= 1
            self._need, self._walk = saved, walk
        self._after = (self.consumed, int(token), value)
        return value


def compile_format(model, fmt: OutputFormat, max_tokens: int) -> GrammarState:
    """Check a format against the model's tokenizer and the request's budget; a fresh state.
    Raises FormatError naming the field."""
    import llguidance

    try:
        vocab = Vocabulary.of(model)
    except Exception as e:  # a tokenizer llguidance cannot read
        raise FormatError(f"response_format: this model's tokenizer cannot be used for structured output ({e})") \
            from None
    grammar = grammar_text(fmt)
    field = {"json_schema": "response_format.json_schema.schema", "json_object": "response_format",
             "regex": "response_format.regex", "choice": "response_format.choice",
             "grammar": "response_format.grammar"}[fmt.kind]
    err = llguidance.LLMatcher.validate_grammar(grammar, vocab.ll)
    if err:
        lines = [" ".join(ln.split()) for ln in err.splitlines() if ln.strip()]
        first = lines[0] + "".join(f" ({ln})" for ln in lines[1:] if ln.startswith("error:"))
        raise FormatError(f"{field} is not accepted by the grammar compiler: {first}")
    state = GrammarState(vocab, grammar)
    if state.matcher.is_error():
        raise FormatError(f"{field}: {state.matcher.get_error().splitlines()[0]}")
    first = state.allowed()
    first[vocab.eos_id] = False
    if not state.accepting and not first.any():
        raise FormatError(f"{field} matches no string at all; nothing can be generated under it")
    need = state.need()
    if need is None:
        raise FormatError(f"{field}: no output of this format was found within 512 tokens; simplify it")
    if need > max_tokens:
        raise FormatError(f"max_tokens is {max_tokens} but the shortest output of this response_format takes "
                          f"{need} tokens (with the end token); raise max_tokens")
    return state
