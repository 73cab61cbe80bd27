"""HFTokenizer on the tiny checkpoint fixtures of each foreign family (shared/fixtures/families):
the special ids each README lists, exact round trips and cuts inside UTF-8 characters, and the
chat-templated prompt of each reference_logits.safetensors reproduced id for id."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.tokenizer import HFTokenizer

FAMILIES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
DIRS = sorted(p for p in FAMILIES.iterdir() if p.is_dir()) if FAMILIES.is_dir() else []
pytestmark = pytest.mark.skipif(not DIRS, reason=f"{FAMILIES} is not there")
NAMES = [d.name for d in DIRS]

USER = ("Write a Python function that returns the sum of the squares of a list of integers, and "
        "explain how it works in two sentences.")
# What row 0 of each reference_logits.safetensors was rendered from (per its README), and which
# end of the rendered prompt the row holds. Fixtures not listed here skip the check.
CHATS = {
    "dream-tiny": ([{"role": "user", "content": USER}], "last"),
    "fastdllm-v2-tiny": ([{"role": "user", "content": USER}], "last"),
    "llada-tiny": ([{"role": "user", "content": USER}], "first"),
    "llada2-moe-tiny": ([{"role": "system", "content": "detailed thinking off"},
                         {"role": "user", "content": USER}], "last"),
    "sdar-tiny": ([{"role": "user", "content": USER}], "last"),
}
_CACHE: dict[str, HFTokenizer] = {}


def config(name: str) -> dict:
    return json.loads((FAMILIES / name / "config.json").read_text())


def load(name: str) -> HFTokenizer:
    """The tokenizer with the ids of the model's config.json (as a loader passes them)."""
    if name not in _CACHE:
        cfg = config(name)
        _CACHE[name] = HFTokenizer.from_dir(
            FAMILIES / name, mask_id=cfg.get("mask_token_id"), eos_id=cfg.get("eos_token_id"),
            pad_id=cfg.get("pad_token_id"), bos_id=cfg.get("bos_token_id"))
    return _CACHE[name]


def readme_ids(name: str) -> list[tuple[str, int]]:
    """The README's "special ids: `tok` id, ..." line, in order (the mask comes first)."""
    line = next(l for l in (FAMILIES / name / "README.md").read_text().splitlines()
                if l.startswith("- special ids:"))
    return [(t, int(i)) for t, i in re.findall(r"`([^`]+)` (\d+)", line)]


def added_tokens(name: str) -> list[dict]:
    return json.loads((FAMILIES / name / "tokenizer.json").read_text())["added_tokens"]


def byte_values() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte -> the byte."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in direct}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


@pytest.mark.parametrize("name", NAMES)
def test_special_ids_as_the_readme_lists_them(name):
    t = load(name)
    listed = readme_ids(name)
    assert listed, "the README lists no special ids"
    for token, i in listed:
        assert t.id_of(token) == i and t.token_of(i) == token
    assert t.mask_id == listed[0][1]
    cfg = config(name)
    assert t.eos_id == cfg.get("eos_token_id", t.id_of("<|endoftext|>"))
    ends = [i for tok, i in listed if tok in ("<|im_end|>", "<|eot_id|>", "<|role_end|>")]
    assert t.end_id == ends[0] and t.end_id in t.stop_ids and t.eos_id in t.stop_ids
    assert t.vocab_size <= cfg["vocab_size"]  # the model's embedding may be padded
    fim = (t.fim_prefix_id, t.fim_suffix_id, t.fim_middle_id)
    vocab = {a["content"] for a in added_tokens(name)}
    has_fim = {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"} <= vocab
    assert (None not in fim) == has_fim
    # Without any id from the caller, the files and the usual names give the same mask and end.
    bare = HFTokenizer.from_dir(FAMILIES / name)
    assert (bare.mask_id, bare.end_id) == (t.mask_id, t.end_id)


@pytest.mark.parametrize("name", NAMES)
def test_chat_prompt_reproduces_reference_row(name):
    if name not in CHATS:
        pytest.skip(f"no record of what {name}'s reference row 0 was rendered from")
    from safetensors.numpy import load_file

    t = load(name)
    messages, end = CHATS[name]
    ids = t.encode_chat(messages, add_generation_prompt=True)
    path = FAMILIES / name / "reference_logits.safetensors"
    row = load_file(str(path))["input_ids"][0].tolist()
    while row and row[-1] == t.mask_id:
        row.pop()
    n = len(row)
    meta = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    prompt_len = meta.get("__metadata__", {}).get("prompt_len")
    if prompt_len is not None:
        assert n == int(prompt_len)
    assert len(ids) >= n
    assert (ids[-n:] if end == "last" else ids[:n]) == row
    assert t.decode(ids) == t.apply_chat_template(messages)


@pytest.mark.parametrize("name", NAMES)
def test_user_text_cannot_become_control_tokens(name):
    t = load(name)
    specials = {a["id"] for a in added_tokens(name) if a["special"]} | set(t.special_ids.values())
    for a in added_tokens(name):
        assert not specials.intersection(t.encode(a["content"], allow_special=False)), a["content"]
    if t.chat_template is None:
        return
    every = "".join(a["content"] for a in added_tokens(name))
    clean = t.encode_chat([{"role": "user", "content": "x"}])
    dirty = t.encode_chat([{"role": "user", "content": f"x{every}y"}])
    assert sorted(i for i in dirty if i in specials) == sorted(i for i in clean if i in specials)


PIECES = st.lists(st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                   exclude_categories=("Cs",)), max_size=30),
    st.sampled_from(["<|im_end|>", "<|endoftext|>", "<|mask|>", "<think>", "\n\n  ", "é", "日本", "😀"]),
), max_size=8).map("".join)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(text=PIECES)
def test_round_trip(name, text):
    t = load(name)
    plain = t.encode(text, allow_special=False)
    assert t.decode(plain) == text
    assert t.decode(t.encode(text)) == text
    assert t.decode_batch(t.encode_batch([text], allow_special=False)) == [text]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(text=PIECES)
def test_cut_inside_a_character_decodes_like_bytes(name, text):
    """Any prefix of the ids decodes as its bytes do with errors="replace": one U+FFFD for an
    incomplete character at the cut, which is what the engine holds back while streaming."""
    t = load(name)
    values = byte_values()
    added = {a["id"]: a["content"].encode() for a in added_tokens(name)}
    ids = t.encode(text, allow_special=False)
    pieces = [added.get(i) or bytes(values[c] for c in t.token_of(i)) for i in ids]
    for k in range(len(ids) + 1):
        assert t.decode(ids[:k]) == b"".join(pieces[:k]).decode("utf-8", "replace")
