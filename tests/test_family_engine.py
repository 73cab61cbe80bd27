"""Foreign checkpoint families through the public surface: `unmask.load(DIR)`, `.logits`, the engine
(every plan), the reference sampler, the CLI and the HTTP server.

The project's own tiny checkpoints (families/tiny.py) are used everywhere; the shared fixtures
(reference logits computed by each family's own code) are checked where ../shared is present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

import unmask
from test_server_support import live
from unmask import SamplingParams
from unmask.errors import UserError
from unmask.families.tiny import tiny_families, write_tiny

FAMILIES = [t for t in tiny_families() if t != "unmask"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
FIXTURES = sorted(p.name for p in SHARED.iterdir() if (p / "config.json").exists()) if SHARED.is_dir() else []
PROMPTS = ["def add(a, b):", "class Stack:\n    def push(self, x):", [{"role": "user", "content": "Add two numbers."}]]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models on a shared 2-core machine."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {t: unmask.load(write_tiny(t, root / t)[0]) for t in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_score_the_token_at_their_position(tiny, family):
    model = tiny[family]
    ids = torch.randint(0, model.tokenizer.vocab_size, (2, 12))
    got = model.logits(ids)
    raw = model.net(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 12, model.config.vocab_size)
    if model.config.logit_shift:
        assert torch.equal(got[:, 1:], raw[:, :-1]) and torch.equal(got[:, 0], raw[:, 0])
    else:
        assert torch.equal(got, raw)
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.logits([[model.config.vocab_size]])


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_batched_equals_alone_and_equals_the_reference(tiny, family):
    model = tiny[family]
    # every policy with both fallbacks, and a seeded sampling row, in one batch
    sps = [SamplingParams(max_tokens=24, policy=p, threshold=t, fallback=f) for p, t in
           (("threshold", 0.5), ("topk", None), ("margin", 0.2), ("factor", 1.0), ("entropy", 0.5))
           for f in ("best", "leftmost")]
    sps.append(SamplingParams(max_tokens=24, temperature=0.8, seed=3))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(sps))]
    batched = unmask.Engine(model, max_batch=16).generate(prompts, sps)
    for p, sp, b in zip(prompts, sps, batched):
        alone = unmask.Engine(model, max_batch=16).generate([p], sp)[0]
        assert alone.token_ids == b.token_ids and b.finish_reason in ("stop", "length")
    # One token per step, no cache: the engine is the reference sampler token for token.
    for prompt in PROMPTS[:2]:
        ref = unmask.reference_generate(model, prompt, max_tokens=20)
        eng = unmask.Engine(model, cache="none").generate([prompt], SamplingParams(max_tokens=20, policy="topk"))[0]
        assert eng.token_ids == ref.token_ids and eng.nfe == ref.nfe


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("sdar", "llada2_moe", "Fast_dLLM_Qwen")])
def test_block_families_exact_cache_equals_no_cache(tiny, family):
    """Block-causal families decode on the exact cache: the same tokens as re-encoding everything
    (Fast-dLLM v2 also feeds the position before each block, whose output scores its first token)."""
    model = tiny[family]
    sp = SamplingParams(max_tokens=28, policy="threshold", threshold=0.3)
    exact = unmask.Engine(model, lookahead=False).generate(PROMPTS, sp)
    none = unmask.Engine(model, cache="none").generate(PROMPTS, sp)
    assert [o.token_ids for o in exact] == [o.token_ids for o in none]
    assert unmask.Engine(model).plan.name == "exact"


@pytest.mark.parametrize("family", ["Dream", "Fast_dLLM_Qwen"])
def test_shifted_families_need_a_prompt(tiny, family):
    with pytest.raises(UserError, match="needs at least one prompt token"):
        unmask.Engine(tiny[family]).generate([""], SamplingParams(max_tokens=4))


def test_chat_ends_at_end_of_turn(tmp_path):
    model = unmask.load(write_tiny("sdar", tmp_path / "sdar")[0])
    tok = model.tokenizer

    class Prefer(torch.nn.Module):  # a head whose favourite token is end-of-turn, then a plain one
        def forward(self, h):
            out = h.new_zeros(*h.shape[:-1], model.config.vocab_size)
            out[..., tok.end_id], out[..., tok.encode("x")[0]] = 2.0, 1.0
            return out

    model.net.lm_head = Prefer()
    out = unmask.Engine(model).generate([PROMPTS[2]], SamplingParams(max_tokens=8))[0]
    assert out.finish_reason == "stop" and out.token_ids == []
    plain = unmask.Engine(model).generate(["x = 1"], SamplingParams(max_tokens=8))[0]
    assert plain.finish_reason == "length"  # a plain completion does not stop at end-of-turn


# ---- the shared fixtures: each family's own reference logits, the CLI and HTTP ------------------------
@pytest.mark.skipif(not FIXTURES, reason="../shared/fixtures/families is not present")
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_logits_generate_and_serve(name, tmp_path):
    from safetensors.torch import load_file

    d = SHARED / name
    model = unmask.load(d)
    ref = load_file(d / "reference_logits.safetensors")
    want = ref["logits_shifted"] if "logits_shifted" in ref else ref["logits"]  # position i scores token i
    assert (model.logits(ref["input_ids"]) - want).abs().max().item() < 1e-4
    env = {**os.environ, "PYTHONPATH": str(Path(unmask.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "unmask.cli", "generate", "--model", str(d), "--max-tokens", "12",
                        "--json", "def add(a, b):"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] <= 12
    with live(model) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        c = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=10, temperature=0)
        assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 10
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=10)
        assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 5


def test_fill_in_the_middle_where_the_family_can(tiny):
    """Full-attention families see the suffix natively; block families use their FIM tokens (Qwen's,
    for SDAR and Fast-dLLM v2); a block family without them is refused in one line."""
    sp = SamplingParams(max_tokens=12, suffix="\n    return c\n")
    for family in ("llada", "Dream"):
        out = unmask.Engine(tiny[family]).generate(["def add(a, b):\n"], sp)[0]
        assert out.finish_reason in ("stop", "length")
    for family in ("sdar", "Fast_dLLM_Qwen", "llada2_moe"):
        model = tiny[family]
        if model.tokenizer.fim_prefix_id is None:
            with pytest.raises(UserError, match="fill-in-the-middle tokens"):
                unmask.Engine(model).generate(["def add(a, b):\n"], sp)
        else:
            head = unmask.Engine(model).processor.process("x = ", sp, "r")[0].head
            assert head[0] == model.tokenizer.fim_prefix_id and head[-1] == model.tokenizer.fim_middle_id


@pytest.mark.parametrize("family", ["Dream", "Fast_dLLM_Qwen"])
def test_training_losses_score_shifted_families_as_inference_does(tiny, family, monkeypatch):
    """With one position j masked, the loss's prediction for j is the model's inference-time logits
    for j (`Pretrained.logits` on that canvas: shifted back, under the family's attention)."""
    import unmask.diffusion.losses as L

    model = tiny[family]
    cfg = model.config
    x0 = torch.randint(0, model.tokenizer.vocab_size, (1, 40))
    x0[x0 == cfg.mask_token_id] = 5
    for j in (9, 32, 33):  # 32: a block's first position (block 32) takes the previous block's clean end
        masked = torch.zeros_like(x0, dtype=torch.bool)
        masked[0, [5, j]] = True  # position 5 is noised too, but only j is scored
        w = torch.zeros(x0.shape)
        w[0, j] = 1.0
        monkeypatch.setattr(L, "diffusion_masks", lambda *a, **k: (masked, w))
        res = L.compute_loss(cfg.objective, model.net, x0, None, None, cfg.mask_token_id, cfg.block_size)
        # What inference sees when it scores j: earlier blocks clean (block families), this block as noised.
        seen = masked.clone()
        if cfg.attention == "block" and j // cfg.block_size > 0:
            seen[0, 5] = False
        xt = torch.where(seen, cfg.mask_token_id, x0)
        logits = model.logits(xt)[0, j].clone()
        logits[cfg.mask_token_id] = float("-inf")
        want = torch.nn.functional.cross_entropy(logits[None], x0[0, j:j + 1])
        assert torch.allclose(res.nll, want, atol=1e-4), (j, float(res.nll), float(want))


@pytest.mark.parametrize("family", ["sdar", "Dream"])
def test_lora_finetune_of_a_foreign_checkpoint(tmp_path, family):
    from unmask.config import FinetuneConfig
    from unmask.train.finetune import finetune

    src = write_tiny(family, tmp_path / family)[0]
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"key {i} ->", "completion": f" value {7 * i}"} for i in range(24)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = finetune(src, data, tmp_path / "out", FinetuneConfig(lora=True, epochs=3, batch_size=4), log=lambda m: None)
    assert s["lora_layers_merged"] > 0 and s["held_out_loss_after"] < s["held_out_loss_before"]
    tuned = unmask.load(tmp_path / "out")  # our layout, the family's tokenizer and chat conventions
    assert type(tuned.tokenizer).__name__ == "HFTokenizer" and tuned.family.name == unmask.load(src).family.name
    assert tuned.config.logit_shift == unmask.load(src).config.logit_shift
    out = unmask.Engine(tuned).generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=6))[0]
    assert out.finish_reason in ("stop", "length")
