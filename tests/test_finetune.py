"""`unmask finetune`: examples are laid out as the engine lays out the same request, only answers are
learned, a fine-tune learns its data (held-out loss falls, the engine then writes the answer), LoRA
starts as a no-op and merges into exactly the model it trained, and bad input is one clear line."""
from __future__ import annotations

import json

import pytest
import torch

import unmask
from conftest import random_pretrained
from unmask.config import FinetuneConfig
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.sampling.prompt import layout_prompt
from unmask.train.finetune import finetune, held_out_loss
from unmask.train.sft_data import Example, collate, encode_example, load_examples

pytestmark = pytest.mark.usefixtures("single_thread")


def small(tok, attention, **kw):
    # Small weights in the blocks: a trainable model, not the near-one-hot one the engine tests use.
    # The (tied) embedding keeps its large ones, so that frozen under LoRA it can still give sharp logits.
    m = random_pretrained(tok, attention, max_seq_len=64, **kw)
    with torch.no_grad():
        for n, p in m.net.named_parameters():
            if p.dim() == 2 and not n.startswith(("embed", "lm_head")):
                p.mul_(0.02 / 0.3)
    return m


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("attention", ["block", "causal", "full"])
def test_examples_use_the_engines_layout(tok, attention):
    m = random_pretrained(tok, attention)
    head, ans = encode_example(m, {"prompt": "def add(a, b):\n    ", "completion": "return a + b"}, "x")
    # healing: the trailing newline + indentation belongs to the answer, as the engine sends it
    assert head == layout_prompt(m, "def add(a, b):")[0]
    assert tok.decode(ans[:-1]) == "\n    return a + b" and ans[-1] == tok.eos_id
    head, ans = encode_example(m, {"prefix": "def f(x):\n", "suffix": "\n    return y\n", "middle": "    y = x"}, "x")
    assert head == layout_prompt(m, "def f(x):", "\n    return y\n")[0]
    assert tok.decode(ans[:-1]) == "\n    y = x" and ans[-1] == tok.eos_id
    chat = [{"role": "user", "content": "add"}]
    head, ans = encode_example(m, {"messages": chat + [{"role": "assistant", "content": "a + b"}]}, "x")
    assert head == layout_prompt(m, chat)[0] and ans[-1] == tok.end_id  # a chat turn stops at end-of-turn
    assert encode_example(m, {"prompt": chat, "completion": "a + b"}, "x") == (head, ans)
    head, ans = encode_example(m, {"text": "x = 1"}, "x")
    assert head == [] and tok.decode(ans[:-1]) == "x = 1"


@pytest.mark.parametrize("objective,block", [("bd3lm", 4), ("mdlm", 4), ("ar", 1)])
def test_collate_learns_answers_only(objective, block):
    ex = [Example((5, 6, 7, 8, 9), 2, 1), Example((5, 6, 7), 1, 2), Example(tuple(range(10, 19)), 4, 3)]
    x0, prompt = collate(ex, objective, block, eos_id=0, pad_id=3)
    L = x0.shape[1]
    assert L == (12 if objective == "bd3lm" else 9)
    for i, e in enumerate(ex):
        n = len(e.ids)
        assert x0[i, :n].tolist() == list(e.ids)
        assert prompt[i, :e.n_prompt].all() and not prompt[i, e.n_prompt:n].any()
        tail = x0[i, n:].tolist()
        if objective == "mdlm":  # LLaDA: EOS to the end, learned
            assert tail == [0] * (L - n) and not prompt[i, n:].any()
        elif objective == "bd3lm":  # EOS to the end of the last answer block, then padding nobody learns
            end = -(-n // block) * block
            assert tail == [0] * (end - n) + [3] * (L - end)
            assert not prompt[i, n:end].any() and prompt[i, end:].all()
        else:
            assert tail == [3] * (L - n) and prompt[i, n:].all()


def test_bad_lines_name_file_and_line(tok, tmp_path):
    m = random_pretrained(tok, "block")
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 3}\n')
    with pytest.raises(UserError, match=rf"{p}:3: 'completion' must be a string"):
        load_examples(m, p, 64)[0]
    p.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(UserError, match=rf"{p}:2: not valid JSON"):
        load_examples(m, p, 64)[0]
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": " "}\n')
    with pytest.raises(UserError, match=rf"{p}:2: 'completion' is empty; give the answer to learn, or drop the line"):
        load_examples(m, p, 64)[0]
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}))
    with pytest.raises(UserError, match=rf"{p}:1: the assistant turn's content is empty"):
        load_examples(m, p, 64)[0]
    p.write_text('{"question": "a"}\n')
    with pytest.raises(UserError, match=rf"{p}:1: unrecognised keys \['question'\]"):
        load_examples(m, p, 64)[0]
    p.write_text(json.dumps({"text": "x = 1\n" * 40}) + "\n")
    with pytest.raises(UserError, match=rf"{p}:1: the example is \d+ tokens, over the 64 of --seq-len"):
        load_examples(m, p, 64)[0]
    with pytest.raises(UserError, match="holds no examples to train on; all 1 are longer than 64 tokens"):
        load_examples(m, p, 64, skip_long=True)
    p.write_text(json.dumps({"text": "x = 1\n" * 40}) + "\n" + json.dumps({"text": "x = 1"}) + "\n")
    kept, skipped = load_examples(m, p, 64, skip_long=True)
    assert skipped == 1 and [e.line for e in kept] == [2]
    p.write_text("\n")
    with pytest.raises(UserError, match="holds no examples to train on; write one JSON object per line"):
        load_examples(m, p, 64)[0]
    with pytest.raises(UserError, match="no such file"):
        load_examples(m, tmp_path / "none.jsonl", 64)[0]


FACTS = [(f"v{i} = ", f"{i * 7 % 10}") for i in range(10)]


@pytest.mark.parametrize("attention,lora", [("block", False), ("causal", False), ("causal", True)])
def test_finetune_learns_its_examples(tok, tmp_path, attention, lora):
    """A few prompt -> answer pairs, learned until the engine writes every answer at temperature 0."""
    base = small(tok, attention)
    src = tmp_path / "base"
    unmask.save(base, src, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": a} for p, a in FACTS])
    cfg = FinetuneConfig(epochs=400, batch_size=10, lr=1e-2 if lora else 3e-3, val_frac=0.0, lora=lora,
                         lora_rank=8, lora_alpha=16)
    s = finetune(src, data, tmp_path / "out", cfg, log=lambda *_: None)
    assert s["steps"] == 400 and s["lora_layers_merged"] == (14 if lora else 0)
    model = unmask.load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["steps"] == 400
    outs = Engine(model).generate([p for p, _ in FACTS], SamplingParams(max_tokens=4, temperature=0.0))
    assert [o.text for o in outs] == [a for _, a in FACTS]
    assert all(o.finish_reason == "stop" for o in outs)  # and it learned to stop after the answer


def test_held_out_loss_falls_and_lora_merges_exactly(tok, tmp_path):
    base = small(tok, "block")
    src = tmp_path / "base"
    unmask.save(base, src, dtype=torch.float32)
    recs = [{"prompt": f"def f{i}(x):\n    ", "completion": "return x + 1\n"} for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = FinetuneConfig(epochs=20, batch_size=6, lr=1e-2, val_frac=0.2, lora=True)
    s = finetune(src, data, tmp_path / "out", cfg, log=lambda *_: None)
    assert s["held_out_examples"] == 4 and s["train_examples"] == 16
    assert s["held_out_loss_after"] < 0.5 * s["held_out_loss_before"]
    # the saved, merged model measures what the adapters measured
    held = [e for e in load_examples(unmask.load(src), data, 64)[0] if e.line in s["held_out_lines"]]
    assert len(held) == 4
    merged = unmask.load(tmp_path / "out").net
    assert held_out_loss(merged, held, cfg, "cpu") == pytest.approx(s["held_out_loss_after"], rel=1e-4)
    assert held_out_loss(unmask.load(src).net, held, cfg, "cpu") == pytest.approx(s["held_out_loss_before"], rel=1e-6)


def test_lora_starts_as_the_base_model(tok, tmp_path):
    from unmask.train.lora import add_lora, merge_lora

    m = small(tok, "causal")
    x = torch.randint(5, 200, (2, 12))
    ref = m.net(x)
    params = add_lora(m.net, ["q_proj", "down_proj"], 4, 8.0, 0.0)
    assert params and all("lora_" in n for n, p in m.net.named_parameters() if p.requires_grad)
    torch.testing.assert_close(m.net(x), ref, rtol=0, atol=0)
    assert merge_lora(m.net) == 4
    assert all(type(mod) is torch.nn.Linear for n, mod in m.net.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(m.net(x), ref, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="LoRA target 'c_attn' names no linear layer"):
        add_lora(small(tok, "causal").net, ["c_attn"], 4, 8.0, 0.0)


def test_refuses_to_overwrite(tok, tmp_path):
    src = tmp_path / "base"
    unmask.save(small(tok, "block"), src, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x = 1"}] * 3)
    with pytest.raises(UserError, match="already exists and is not empty"):
        finetune(src, data, src, FinetuneConfig(), log=lambda *_: None)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True])
def test_interrupted_then_resumed_equals_one_run(tok, tmp_path, lora):
    """A fine-tune stopped after its step-10 checkpoint and resumed writes exactly the weights of one
    uninterrupted run (weights, optimizer, batch order and noise all restored)."""
    from safetensors.torch import load_file

    src = tmp_path / "base"
    unmask.save(small(tok, "block"), src, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": a} for p, a in FACTS])
    cfg = FinetuneConfig(epochs=12, batch_size=3, lr=3e-3, val_frac=0.0, lora=lora, ckpt_interval=5)
    whole = finetune(src, data, tmp_path / "whole", cfg, log=lambda *_: None)
    assert whole["steps"] == 40 and not (tmp_path / "whole" / "checkpoints").exists()

    def killer(msg):
        if msg.startswith("step 12/"):
            raise _Killed()

    with pytest.raises(_Killed):
        finetune(src, data, tmp_path / "cut", cfg, log=killer)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    with pytest.raises(UserError, match="already exists and is not empty; choose another --out \\(or --resume"):
        finetune(src, data, tmp_path / "cut", cfg, log=lambda *_: None)
    other = write_jsonl(tmp_path / "e.jsonl", [{"prompt": p, "completion": a + "0"} for p, a in FACTS])
    with pytest.raises(UserError, match="was written by another fine-tune \\(data_sha256 differs\\)"):
        finetune(src, other, tmp_path / "cut", cfg, log=lambda *_: None, resume=True)
    said = []
    resumed = finetune(src, data, tmp_path / "cut", cfg, log=said.append, resume=True)
    assert "resumed from step 10 of 40" in said
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(h["step"], h["loss"]) for h in resumed["history"]] == [(h["step"], h["loss"]) for h in whole["history"]]
    with pytest.raises(UserError, match="holds no fine-tune checkpoint"):
        finetune(src, data, tmp_path / "fresh", cfg, log=lambda *_: None, resume=True)


def test_activation_checkpointing_changes_nothing_but_memory(tok, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "base"
    unmask.save(small(tok, "block"), src, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": a} for p, a in FACTS])
    for name, ac in (("plain", False), ("ac", True)):
        finetune(src, data, tmp_path / name, FinetuneConfig(epochs=3, batch_size=4, lr=3e-3, val_frac=0.0,
                                                             activation_checkpointing=ac), log=lambda *_: None)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ac" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
