"""Supervised fine-tuning data: a JSONL file of examples, each turned into the token ids a request
would put on the canvas, plus where the answer starts.

One JSON object per line, in one of these shapes:
- `{"prompt": str | [messages], "completion": str}`: a completion of a text prompt, or a chat
  prompt answered by the assistant;
- `{"messages": [..., {"role": "assistant", "content": str}]}`: a chat whose last turn is the answer;
- `{"prefix": str, "suffix": str, "middle": str}`: fill-in-the-middle, in the model's FIM layout;
- `{"text": str}`: plain text, every token learned;
- `{"messages": [{"role": "user", "content": NEXT-EDIT SECTIONS}, {"role": "assistant", "content": str}]}`:
  an edit example in Mercury's `/v1/edit/completions` shape (frontend/edit.py): laid out as the server
  lays out that request, an infilling task whose middle is the rewritten region (the answer).

Examples are laid out exactly as the engine lays out the same request (`frontend/prompt.py`), with
prompt healing's split (a prompt ending in a newline plus indentation gives that whitespace to the
answer), and the answer ends with the token the engine stops at (EOS; end-of-turn for chats).
The prompt is never noised and never scored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..frontend.healing import ASCII_WHITESPACE, split_trailing_whitespace
from ..errors import UserError
from ..frontend.prompt import layout_prompt

SHAPES = "{prompt, completion}, {messages}, {prefix, suffix, middle} or {text}"


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    n_prompt: int  # ids[:n_prompt] is the prompt: clean, no loss
    line: int  # where it came from, for error messages


def _str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(v).__name__}")
    return v


def encode_example(model, rec, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one record."""
    tok = model.tokenizer
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with {SHAPES}")
    keys = set(rec)
    if keys == {"text"}:
        return [], tok.encode(_str(rec, "text", where), allow_special=False) + [tok.eos_id]
    if keys == {"prefix", "suffix", "middle"}:  # an empty middle is allowed: it teaches inserting nothing
        prefix, ws = split_trailing_whitespace(_str(rec, "prefix", where), ASCII_WHITESPACE)
        head, _ = layout_prompt(model, prefix, _str(rec, "suffix", where))
        return head, tok.encode(ws + _str(rec, "middle", where), allow_special=False) + [tok.eos_id]
    if keys == {"messages"} or keys == {"prompt", "completion"}:
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                    or msgs[-1].get("role") != "assistant":
                raise UserError(f"{where}: 'messages' must be a list ending in an assistant turn (the answer "
                                "to learn), after at least one other message")
            prompt, answer = msgs[:-1], msgs[-1].get("content")
            if not isinstance(answer, str):
                raise UserError(f"{where}: the assistant turn's content must be a string")
            if len(prompt) == 1 and isinstance(prompt[0].get("content"), str) \
                    and "<|code_to_edit|>" in prompt[0]["content"]:
                return _edit_example(model, prompt[0]["content"], answer, where)
        else:
            prompt, answer = rec["prompt"], _str(rec, "completion", where)
        if not answer.strip():  # nothing to learn but stopping at once: almost always a data bug
            which = "the assistant turn's content" if "messages" in rec else "'completion'"
            raise UserError(f"{where}: {which} is empty; give the answer to learn, or drop the line")
        try:
            if isinstance(prompt, str):
                prompt, ws = split_trailing_whitespace(prompt, ASCII_WHITESPACE)
                answer = ws + answer
                head, _ = layout_prompt(model, prompt)
                return head, tok.encode(answer, allow_special=False) + [tok.eos_id]
            if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
                raise UserError("'prompt' must be a string or a non-empty list of chat messages")
            head, _ = layout_prompt(model, prompt)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        return head, tok.encode(answer, allow_special=False) + [tok.end_id]
    raise UserError(f"{where}: unrecognised keys {sorted(keys)}; each line must be one of {SHAPES}")


def _edit_example(model, content: str, answer: str, where: str) -> tuple[list[int], list[int]]:
    from ..frontend.edit import edit_task, parse_edit

    try:
        prefix, suffix = edit_task(parse_edit(content))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    prefix, ws = split_trailing_whitespace(prefix, ASCII_WHITESPACE)
    head, _ = layout_prompt(model, prefix, suffix)
    return head, model.tokenizer.encode(ws + answer, allow_special=False) + [model.tokenizer.eos_id]


def load_examples(model, path: str | Path, max_len: int, skip_long: bool = False) -> tuple[list[Example], int]:
    """The file's examples, and how many were left out for being longer than max_len (skip_long;
    otherwise the first such example is an error)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; --data takes a JSONL file of examples ({SHAPES})")
    out, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            head, answer = encode_example(model, rec, where)
            if len(head) + len(answer) > max_len:
                if skip_long:
                    skipped += 1
                    continue
                raise UserError(f"{where}: the example is {len(head) + len(answer)} tokens, over the "
                                f"{max_len} of --seq-len; shorten it, raise --seq-len (at most the model's "
                                f"max_seq_len, {model.config.max_seq_len}) or pass --skip-long")
            if model.config.attention == "causal" and not head:
                head, answer = answer[:1], answer[1:]  # the first token has nothing to be predicted from
            out.append(Example(tuple(head + answer), len(head), n))
    if not out:
        why = f"all {skipped} are longer than {max_len} tokens" if skipped else \
            f"write one JSON object per line ({SHAPES})"
        raise UserError(f"{path}: holds no examples to train on; {why}")
    return out, skipped


def collate(examples: list[Example], objective: str, block_size: int, eos_id: int, pad_id: int):
    """(x0, prompt_mask), both (B, L). Padding after an answer:
    - full attention (MDLM, LLaDA's recipe): EOS, learned, so that the model fills the rest of its
      canvas with EOS as it must at inference;
    - block diffusion: EOS to the end of the answer's last block (learned: a block the model
      finishes early is filled with EOS), then clean padding that no earlier block can see;
    - AR: clean padding, not learned (the answer's own stop token is)."""
    L = max(len(e.ids) for e in examples)
    if objective == "bd3lm":
        L = -(-L // block_size) * block_size
    x0 = torch.full((len(examples), L), pad_id, dtype=torch.long)
    prompt = torch.ones(len(examples), L, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        x0[i, :n] = torch.tensor(e.ids)
        end = {"mdlm": L, "bd3lm": -(-n // block_size) * block_size}.get(objective, n)
        x0[i, n:end] = eos_id
        prompt[i, e.n_prompt:end] = False
    return x0, prompt
