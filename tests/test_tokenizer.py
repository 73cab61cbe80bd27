"""Byte-level BPE: exact round trips, fixed special ids, chat template, file errors."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unmask.errors import UserError
from unmask.tokenizer import SPECIAL_TOKENS, Tokenizer, train_from_corpus, train_tokenizer

SAMPLE = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = 1  # tabs\n",
    "for i in range(10):\r\n    print(i, end='')\r\n",
    "s = 'héllo wörld — ünïcödé 日本語 😀'\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
] * 20

ODD = [
    "",
    " ",
    "    ",
    "\t\t\tx",
    "a\r\nb\rc\nd",
    "\x0b\x0c\x1c\x1d\x1e\x85",
    "line\u2028sep\u2029para",
    "nbsp\xa0\u202f\u3000ideographic",
    "trailing spaces   ",
    "   leading spaces",
    "many          spaces   between",
    "emoji 👩‍💻🏳️‍🌈 and flags 🇫🇷",
    "e\u0301 a\u0308 combining \u0338",
    "nul\x00byte\x00",
    "\ufeffbom and \ufffe\uffff nonchars",
    "\U0010ffff\U000e0001 tags",
    "zero\u200bwidth\u200d",
    "مرحبا بالعالم שלום",
    "print('<|mask|>')",
    "<|endoftext|><|endoftext|>",
    "<|user|>\nhi<|end|>\n",
    " <|pad|> ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(SAMPLE, vocab_size=400)


@pytest.mark.parametrize("text", ODD)
def test_round_trip_explicit(tok, text):
    assert tok.decode(tok.encode(text)) == text


# Every code point except surrogates (which cannot be encoded as UTF-8 at all).
ANY_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
    max_size=200,
)
WHITESPACE = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u3000")),
        st.characters(categories=("Zs", "Zl", "Zp", "Cc")),
        st.characters(min_codepoint=32, max_codepoint=126),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(ANY_TEXT, WHITESPACE))
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_matches_single(tok):
    batch = tok.encode_batch(ODD)
    assert batch == [tok.encode(t) for t in ODD]
    assert tok.decode_batch(batch) == ODD
    plain = tok.encode_batch(ODD, allow_special=False)
    assert plain == [tok.encode(t, allow_special=False) for t in ODD]
    assert all(i >= 10 for seq in plain for i in seq)  # corpus text never yields a special id
    assert tok.decode_batch(plain) == ODD
    assert tok.encode("<|mask|>") == [tok.mask_id]  # the flag does not stick after a batch


def test_special_ids_fixed(tok):
    assert [tok.id_of(s) for s in SPECIAL_TOKENS.values()] == list(range(10))
    assert (tok.eos_id, tok.mask_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id) == (3, 4, 5)
    assert tok.encode("<|mask|>") == [tok.mask_id]
    assert 266 < tok.vocab_size <= 400  # a tiny corpus may run out of merges first


def test_decode_specials(tok):
    ids = tok.encode("x = ") + [tok.mask_id, tok.mask_id] + [tok.eos_id]
    assert tok.decode(ids) == "x = <|mask|><|mask|><|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "x = "


def test_deterministic_training():
    a = train_tokenizer(SAMPLE, vocab_size=350)
    b = train_tokenizer(SAMPLE, vocab_size=350)
    assert a.to_str() == b.to_str()


def test_too_small_vocab():
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(SAMPLE, vocab_size=100)


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse a string."},
    ]
    text = tok.apply_chat_template(msgs)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nReverse a string.<|end|>\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|end|>\n")
    ids = tok.encode(text)
    assert ids[0] == tok.id_of("<|system|>") and ids[-2] == tok.id_of("<|assistant|>")
    assert tok.decode(ids) == text
    with pytest.raises(UserError, match="robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.from_file(path)
    assert back.to_str() == tok.to_str()
    assert back.encode("héllo 😀") == tok.encode("héllo 😀")
    assert Tokenizer.from_file(tmp_path).vocab_size == tok.vocab_size  # a directory works too
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.json.*not found"):
        Tokenizer.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize("content", ["{not json", '{"model": 3}', ""])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match="bad.json.*corrupt"):
        Tokenizer.from_file(path)


def test_foreign_tokenizer_rejected(tmp_path):
    # A valid tokenizer.json whose special ids differ from ours must not be silently accepted.
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|mask|>", "<|endoftext|>"])
    hf.train_from_iterator(SAMPLE, trainer)
    path = tmp_path / "foreign.json"
    path.write_text(hf.to_str())
    with pytest.raises(UserError, match="foreign.json.*not trained by unmask"):
        Tokenizer.from_file(path)


def test_train_from_corpus(tmp_path):
    (tmp_path / "c" / "text").mkdir(parents=True)
    rows = [{"package": "p", "path": f"m{i}.py", "text": t} for i, t in enumerate(SAMPLE)]
    (tmp_path / "c" / "text" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train_from_corpus(tmp_path / "c", tmp_path / "out", vocab_size=300)
    assert Tokenizer.from_file(out).vocab_size == 300
    with pytest.raises(UserError, match="unmask data build"):
        train_from_corpus(tmp_path / "missing", tmp_path / "out2")
