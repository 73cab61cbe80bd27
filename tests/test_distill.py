"""`unmask distill`: prompts cut from the corpus at line ends, the teacher is the model's own greedy
one-token-per-forward decoding, examples are laid out as the engine lays out the request, the
fine-tune makes the model sure of its trajectories (and its default decoding then follows them in
fewer forwards), and bad input is one clear line."""
from __future__ import annotations

import json

import pytest
import torch

import unmask
from conftest import random_pretrained
from unmask.config import DistillConfig
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.sampling.prompt import layout_prompt
from unmask.train.distill import Source, distill, distill_loss, draw_sources, to_example

pytestmark = pytest.mark.usefixtures("single_thread")

DOCS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n",
    "import os\n\n\ndef main():\n    path = os.getcwd()\n    print(path)\n    return 0\n",
]


def corpus(tmp_path, docs=DOCS):
    d = tmp_path / "corpus"
    (d / "text").mkdir(parents=True)
    (d / "text" / "train.jsonl").write_text(
        "".join(json.dumps({"package": "pkg", "path": f"m{i}.py", "text": t}) + "\n" for i, t in enumerate(docs)))
    return d


def small(tok, attention="block", **kw):
    # a trainable model: small weights in the blocks, the large (tied) embedding kept
    m = random_pretrained(tok, attention, max_seq_len=128, **kw)
    with torch.no_grad():
        for n, p in m.net.named_parameters():
            if p.dim() == 2 and not n.startswith(("embed", "lm_head")):
                p.mul_(0.3)
    return m


def test_sources_are_whole_lines_of_the_corpus(tmp_path):
    d = corpus(tmp_path)
    docs = [f"# pkg/m{i}.py\n{t}" for i, t in enumerate(DOCS)]
    srcs = draw_sources(d, 40, 0.5, 120, seed=3)
    assert srcs == draw_sources(d, 40, 0.5, 120, seed=3)  # seeded
    assert 5 < sum(s.suffix is not None for s in srcs) < 35
    for s in srcs:
        assert s.prompt and s.prompt.split("\n")[-1].strip(), s  # ends at the end of a non-blank line
        assert len(s.prompt) + len(s.suffix or "") <= 120
        doc = next(x for x in docs if s.prompt in x)
        at = doc.index(s.prompt) + len(s.prompt)
        assert doc[at] == "\n" and doc[at + 1:].split("\n")[0].strip()  # what the model writes is a line
        if s.suffix is not None:
            assert s.suffix.startswith("\n") and s.suffix in doc[at:]
    with pytest.raises(UserError, match="found prompts for only"):
        draw_sources(corpus(tmp_path / "x", ["a\n"] * 3), 4, 0.0, 120, seed=0)
    with pytest.raises(UserError, match="build the corpus first"):
        draw_sources(tmp_path / "none", 4, 0.0, 120, seed=0)


def test_examples_are_the_engines_layout(tok):
    m = random_pretrained(tok, "block")
    src = Source("def add(a, b):", "\n    return c\n")
    head = layout_prompt(m, src.prompt, src.suffix)[0]
    e = to_example(m, src, [7, 8, 9], True, 0)
    assert e.ids == tuple(head) + (7, 8, 9, tok.eos_id) and e.n_prompt == len(head)
    e = to_example(m, src, list(range(10, 20)), False, 0)  # cut off by max_tokens: no EOS, cut to a block end
    assert len(e.ids) % 4 == 0 and e.ids[len(head):] == tuple(range(10, 10 + len(e.ids) - len(head)))


def test_certainty_term_is_the_entropy_where_the_model_is_right(tok):
    m = small(tok)
    ex = [to_example(m, Source("def add(a, b):"), list(range(20, 32)), True, 0)]
    cfg0, cfg1 = DistillConfig(certainty=0.0), DistillConfig(certainty=1.0)
    from unmask.diffusion import get_schedule
    s = get_schedule("linear")
    r0, st0 = distill_loss(m.net, ex, torch.Generator().manual_seed(0), cfg0, s, "cpu")
    r1, st1 = distill_loss(m.net, ex, torch.Generator().manual_seed(0), cfg1, s, "cpu")
    assert st0 == st1 and float(r0.loss.detach()) == pytest.approx(st0["ce"], rel=1e-5)
    assert float(r1.loss.detach()) == pytest.approx(st0["ce"] + st0["entropy_right"], rel=1e-5)
    r1.loss.backward()  # finite gradients, though [MASK]'s probability is exactly 0
    assert all(torch.isfinite(p.grad).all() for p in m.net.parameters() if p.grad is not None)


@pytest.mark.parametrize("lora", [False, True])
def test_distill_follows_the_teacher_in_fewer_forwards(tok, tmp_path, lora):
    src_dir = tmp_path / "base"
    unmask.save(small(tok), src_dir, dtype=torch.float32)
    cfg = DistillConfig(prompts=8, fim_frac=0.25, prompt_chars=80, max_tokens=12, epochs=60, batch_size=8,
                        lr=1e-2 if lora else 2e-3, val_frac=0.0, lora=lora, concurrency=4)
    s = distill(src_dir, tmp_path / "out", cfg, corpus=corpus(tmp_path), log=lambda *_: None)
    out = tmp_path / "out"
    assert {"trajectories.jsonl", "distill.json", "config.json", "README.md"} <= {f.name for f in out.iterdir()}
    assert s["lora_layers_merged"] == (14 if lora else 0) and s["trajectories"] == 8
    recs = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    # the teacher is the base model decoding greedily, one token per forward
    base = unmask.load(src_dir)
    for r in recs[:3]:
        o = Engine(base, lookahead=False).generate(r["prompt"], SamplingParams(max_tokens=12, temperature=0.0, policy="topk", steps=12,
                                                              heal=False, suffix=r["suffix"]))[0]
        assert o.token_ids == r["ids"] and o.nfe == len(o.token_ids)
    # with a confidence threshold, the distilled model writes the teacher's tokens in far fewer forwards
    def run(model):
        same = nfe = tokens = 0
        for r in recs:
            o = Engine(model).generate(r["prompt"], SamplingParams(max_tokens=12, temperature=0.0, heal=False,
                                                                   suffix=r["suffix"], policy="threshold",
                                                                   threshold=0.7))[0]
            same += o.token_ids == r["ids"]
            nfe, tokens = nfe + o.nfe, tokens + o.completion_tokens
        return same, tokens / nfe

    (same0, tpf0), (same1, tpf1) = run(base), run(unmask.load(out))
    assert tpf0 < 1.5 and tpf1 > 2 * tpf0 and same1 >= 6, (same0, tpf0, same1, tpf1)


def test_reuses_trajectories_and_refuses_bad_input(tok, tmp_path, monkeypatch):
    src_dir = tmp_path / "base"
    unmask.save(small(tok), src_dir, dtype=torch.float32)
    traj = tmp_path / "t.jsonl"
    traj.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "suffix": None, "ids": [20, 21, 22, 23],
                                        "finished": False}) + "\n" for i in range(4)))
    cfg = DistillConfig(epochs=1, batch_size=2, val_frac=0.25, max_tokens=4, concurrency=2)
    s = distill(src_dir, tmp_path / "out", cfg, trajectories=traj, log=lambda *_: None)
    assert s["trajectories"] == 4 and s["train"] == 3 and s["held_out"] == 1 and s["steps"] == 2
    assert s["decoding_before"]["prompts"] == 1 and s["held_out_after"]["ce"] > 0
    assert (tmp_path / "out" / "trajectories.jsonl").read_text() == traj.read_text()
    with pytest.raises(UserError, match="already exists and is not empty"):
        distill(src_dir, tmp_path / "out", cfg, trajectories=traj, log=lambda *_: None)
    import unmask.train.distill as D
    monkeypatch.setattr(D, "default_corpus", lambda: None)
    with pytest.raises(UserError, match="no corpus to draw prompts from: build one with `unmask data build"):
        distill(src_dir, tmp_path / "o2", cfg, log=lambda *_: None)
    traj.write_text('{"prompt": "x", "ids": [1]}\n')
    with pytest.raises(UserError, match=rf"{traj}:1: not a trajectory"):
        distill(src_dir, tmp_path / "o3", cfg, trajectories=traj, log=lambda *_: None)
    unmask.save(random_pretrained(tok, "causal"), tmp_path / "ar", dtype=torch.float32)
    with pytest.raises(UserError, match="is an ar model; distill makes a diffusion model"):
        distill(tmp_path / "ar", tmp_path / "o4", cfg, trajectories=traj, log=lambda *_: None)


def test_a_larger_decode_block(tok, tmp_path):
    src_dir = tmp_path / "base"
    unmask.save(small(tok), src_dir, dtype=torch.float32)
    traj = tmp_path / "t.jsonl"
    traj.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "suffix": None, "ids": list(range(20, 31)),
                                        "finished": i % 2 == 0}) + "\n" for i in range(4)))
    cfg = DistillConfig(epochs=1, batch_size=4, val_frac=0.0, max_tokens=12, block_size=8)
    distill(src_dir, tmp_path / "out", cfg, trajectories=traj, log=lambda *_: None)
    m = unmask.load(tmp_path / "out")
    assert m.config.block_size == 8 and m.generation.block_size == 8
    o = Engine(m).generate("def f(x):", SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert o.completion_tokens > 0
    # a cut-off trajectory ends at a boundary of the new block size (no EOS learned where none was written)
    e = to_example(m, Source("def f1(x):"), list(range(20, 31)), False, 0)
    assert len(e.ids) % 8 == 0
    with pytest.raises(UserError, match="--block-size is for block-diffusion models"):
        unmask.save(random_pretrained(tok, "full"), tmp_path / "full", dtype=torch.float32)
        distill(tmp_path / "full", tmp_path / "o2", cfg, trajectories=traj, log=lambda *_: None)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from unmask.cli import main

    assert main(["distill", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unmask: error:")
    assert main(["distill", "--out", str(tmp_path / "o"), "--fim-frac", "2"]) == 2
    assert "fim_frac" in capsys.readouterr().err


def test_the_readmes_corpus_is_found_by_default(tmp_path, monkeypatch):
    from pathlib import Path

    import unmask.train.distill as D
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("unmask.pretrained.REPO_ROOT", tmp_path / "elsewhere")
    assert D.default_corpus() is None
    corpus(tmp_path / "corpus").rename(tmp_path / "corpus" / "default")
    assert D.default_corpus() == Path("corpus/default")
