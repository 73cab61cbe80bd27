"""`unmask convert` (unmask.convert): our models written in Hugging Face layouts and back. transformers
runs the llama/qwen exports with our logits, round trips are bit-equal, what a layout cannot hold is
refused in one line, and every family fixture goes to our layout and back with equal logits."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import unmask
from unmask.config import MoEConfig
from unmask.convert import convert, our_chat_template
from unmask.errors import UserError
from unmask.families import load_network, supported
from unmask.pretrained import REPO_ROOT, save

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(tok, attention: str, **overrides):
    from conftest import random_pretrained
    return random_pretrained(tok, attention, **overrides)


def _saved(model, d: Path) -> Path:
    return save(model, d, dtype=torch.float32)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("model*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _ids(cfg, n=2, length=29, seed=1, no_mask=True) -> torch.Tensor:
    x = torch.randint(0, cfg.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    if no_mask:
        x[x == cfg.mask_token_id] = cfg.eos_token_id
    return x


def _net_logits(d: Path, x: torch.Tensor) -> torch.Tensor:
    net, *_ = load_network(d)
    with torch.no_grad():
        return net(x)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- (1) our AR model -> llama / qwen2 / qwen3 -> transformers, and back --------------------------------
@pytest.mark.parametrize("to,overrides", [
    ("llama", {}),
    ("llama", {"token_shift": True}),
    ("qwen2", {"tie_embeddings": False}),
    ("qwen3", {"qk_norm": True, "head_size": 16}),
], ids=["llama", "llama-token_shift", "qwen2", "qwen3"])
def test_ar_model_runs_in_transformers_and_comes_back_bit_equal(tok, tmp_path, capsys, to, overrides):
    transformers = pytest.importorskip("transformers")
    model = _model(tok, "causal", **overrides)
    src = _saved(model, tmp_path / "src")
    hf_dir = convert(src, tmp_path / to, to=to)
    notes = capsys.readouterr().err
    assert ("token_shift dropped" in notes) == bool(overrides.get("token_shift"))
    assert ("written as zeros" in notes) == (to == "qwen2")
    x = _ids(model.config)
    with torch.no_grad():
        ours = model.net(x)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.dtype == torch.float32  # config.json names the stored dtype
    with torch.no_grad():
        theirs = hf(x).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{to}{'+token_shift' if overrides.get('token_shift') else ''}: transformers vs unmask max |diff| {diff:.2e}")
    assert diff < TOL
    # transformers' tokenizer is ours: same ids, same chat prompt (transformers 5 reads a qwen2
    # directory's tokenizer.json with Qwen2's own pre-tokenizer, which the conversion says)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert ("Qwen2's pre-tokenizer" in notes) == (to == "qwen2")
    if to == "qwen2":
        hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    text = "def add(a, b):\n    return a + b<|endoftext|>class Stack:\n"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "class Stack:"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    # unmask reads the export as a family checkpoint with the same logits
    assert torch.equal(_net_logits(hf_dir, x), ours)
    loaded = unmask.load(hf_dir)  # the whole model, our tokenizer in the family's layout
    assert loaded.config.family == to
    assert torch.equal(loaded.logits(x), model.logits(x))
    # ... and back: our config (family, block size, logit shift, decoding defaults) and our tensors
    back = convert(hf_dir, tmp_path / "back")
    restored = unmask.load(back)
    want_cfg = model.config.model_copy(update={"token_shift": False, "qkv_bias": to == "qwen2"})
    assert restored.config == want_cfg and restored.generation == model.generation
    assert type(restored.tokenizer) is type(tok) and restored.tokenizer.same_as(tok)
    want = _tensors(src)
    for name in ("prev_embed.weight", "gap_embed.weight"):
        want.pop(name, None)
    got = _tensors(back)
    if to == "qwen2":
        zeros = {k: v for k, v in got.items() if k.endswith("_proj.bias")}
        assert len(zeros) == 3 * model.config.n_layers and not any(v.any() for v in zeros.values())
        got = {k: v for k, v in got.items() if k not in zeros}
    _bit_equal(want, got)
    assert torch.equal(restored.logits(x), model.logits(x))


def test_round_trip_of_our_layout_is_identical_files(tok, tmp_path):
    """ours -> llama -> ours: config.json and generation_config.json as they were, tensors bit-equal."""
    model = _model(tok, "causal")
    src = _saved(model, tmp_path / "src")
    back = convert(convert(src, tmp_path / "llama", to="llama"), tmp_path / "back")
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (back / f).read_text() == (src / f).read_text(), f
    _bit_equal(_tensors(src), _tensors(back))


# ---- (2) a full-attention dLLM -> llada -> back; (3) a block dLLM -> sdar -> back ---------------------------
@pytest.mark.parametrize("to,attention,overrides", [
    ("llada", "full", {"n_kv_heads": 2}),
    ("sdar", "block", {"qk_norm": True, "head_size": 16}),
    ("Fast_dLLM_Qwen", "block", {"logit_shift": 1, "block_size": 8}),
    ("Dream", "full", {"logit_shift": 1}),
    ("llada2_moe", "block", {"qk_norm": True, "block_size": 32, "max_seq_len": 64}),
])
def test_dllm_round_trip_through_a_family_layout(tok, tmp_path, to, attention, overrides):
    model = _model(tok, attention, **overrides)
    src = _saved(model, tmp_path / "src")
    out = convert(src, tmp_path / to, to=to)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == to
    x = _ids(model.config, no_mask=False)  # a dLLM sees [MASK]
    with torch.no_grad():
        ours = model.net(x)
    theirs = _net_logits(out, x)  # as the family reads it
    print(f"{to}: family-layout vs source max |diff| {(ours - theirs).abs().max().item():.2e}")
    assert torch.equal(ours, theirs)
    back = convert(out, tmp_path / "back")
    restored = unmask.load(back)
    assert restored.config == model.config.model_copy(update={"qkv_bias": model.config.qkv_bias or to in (
        "Dream", "Fast_dLLM_Qwen")})
    got = {k: v for k, v in _tensors(back).items() if not (k.endswith("_proj.bias") and not model.config.qkv_bias)}
    _bit_equal(_tensors(src), got)
    assert torch.equal(restored.logits(x), model.logits(x))


# ---- (4) refusals --------------------------------------------------------------------------------------
def test_token_shift_dllm_is_refused_by_llada_in_one_line(tok, tmp_path):
    src = _saved(_model(tok, "block", token_shift=True), tmp_path / "src")
    for to in ("llada", "sdar", "llama"):
        with pytest.raises(UserError) as e:
            convert(src, tmp_path / "out", to=to)
        msg = _one_line(e)
        assert f"cannot convert to {to!r}" in msg and "token_shift" in msg and msg.endswith("layouts that can hold "
                                                                                              "this model: unmask")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_refusals_name_the_feature_and_the_layouts_that_can(tok, tmp_path, make_config):
    # a block dLLM without q/k norms: SDAR (Qwen3) always normalises q and k
    src = _saved(_model(tok, "block"), tmp_path / "block")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="sdar")
    assert "no q/k norms" in _one_line(e) and "it would read as q/k norms" in str(e.value)
    assert str(e.value).endswith("layouts that can hold this model: unmask")
    # ... with them, and blocks of 4: sdar can; LLaDA2 cannot (blocks of 32)
    src = _saved(_model(tok, "block", qk_norm=True), tmp_path / "block-qk")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="llada2_moe")
    assert "blocks of 4" in _one_line(e) and str(e.value).endswith("layouts that can hold this model: unmask, sdar")
    # block attention into an AR layout, full attention into a block one
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="qwen3")
    assert "'block' attention" in _one_line(e)
    src = _saved(_model(tok, "full"), tmp_path / "full")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="sdar")
    assert "full attention" in _one_line(e) and "layouts that can hold this model: unmask, llada" in str(e.value)
    # MoE into llama
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=16)
    src = _saved(_model(tok, "causal", moe=moe), tmp_path / "moe")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="llama")
    assert "mixture-of-experts" in _one_line(e) and str(e.value).endswith("layouts that can hold this model: unmask")


def test_bad_targets_and_destinations(tok, tmp_path):
    src = _saved(_model(tok, "causal"), tmp_path / "src")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out", to="gpt2")
    assert "'gpt2' is not supported" in _one_line(e) and "llama" in str(e.value)
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "out.gguf", to="sdar")
    assert "llama.cpp has no architecture" in _one_line(e) and not (tmp_path / "out.gguf").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError) as e:
        convert(src, tmp_path / "notes", to="llama")
    assert "not a model directory" in _one_line(e) and (tmp_path / "notes" / "todo.txt").exists()
    with pytest.raises(UserError) as e:
        convert(tmp_path / "missing", tmp_path / "out")
    assert "not found" in _one_line(e)


def test_dtype_and_in_place_conversion(tok, tmp_path):
    model = _model(tok, "causal")
    src = _saved(model, tmp_path / "src")
    convert(src, src, dtype="bf16")  # in place: read first, then renamed over
    t = _tensors(src)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert torch.equal(t["embed.weight"], model.net.embed.weight.detach().to(torch.bfloat16))
    out = convert(src, tmp_path / "llama", to="llama")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert convert(out, tmp_path / "fp32", dtype="fp32") and \
        all(v.dtype == torch.float32 for v in _tensors(tmp_path / "fp32").values())


def test_record_that_no_longer_matches_is_ignored(tok, tmp_path, capsys):
    model = _model(tok, "causal")
    out = convert(_saved(model, tmp_path / "src"), tmp_path / "llama", to="llama")
    raw = json.loads((out / "config.json").read_text())
    raw["unmask"]["config"]["n_layers"] = 3
    (out / "config.json").write_text(json.dumps(raw))
    back = convert(out, tmp_path / "back")
    assert "no longer describes the network" in capsys.readouterr().err
    assert unmask.load(back).config.family == "llama"


def test_our_chat_template_is_our_chat_format(tok):
    from unmask.tokenizer import ChatTemplate
    chat = [{"role": "user", "content": "hi <|end|>"}, {"role": "assistant", "content": "x = 1\n"}]
    tpl = ChatTemplate(our_chat_template(), "test")
    assert tpl.render(chat, add_generation_prompt=True) == tok.apply_chat_template(chat)
    assert tpl.render(chat, add_generation_prompt=False) == tok.apply_chat_template(chat, False)
    with pytest.raises(UserError):
        tpl.render([{"role": "tool", "content": "x"}])


def test_gguf_source_and_chat_template_placement(tmp_path, capsys):
    """A .gguf converts like a directory (dequantised, float32 with --dtype keep); a template kept where
    the target family does not look is also written where it does."""
    pytest.importorskip("gguf")
    from unmask.families import get
    from unmask.families.gguf import write_gguf
    from unmask.families.tiny import write_tiny

    d, _ = write_tiny("llama", tmp_path / "llama", dtype=torch.float32)
    g = write_gguf(d, tmp_path / "g" / "m.gguf", "F32")
    orig = unmask.load(g)
    out = convert(g, tmp_path / "from-gguf", to="llama")
    assert "dequantised" in capsys.readouterr().err
    x = _ids(orig.config)
    assert torch.equal(unmask.load(out).logits(x), orig.logits(x))
    assert all(v.dtype == torch.float32 for v in _tensors(out).values())
    # LLaDA reads its template from tokenizer_config.json only
    d, _ = write_tiny("llada", tmp_path / "llada", dtype=torch.float32)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(tc.pop("chat_template"))
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    back = convert(convert(d, tmp_path / "ours"), tmp_path / "back", to="llada")
    assert get("llada").chat_template(back) == (d / "chat_template.jinja").read_text()


# ---- (5) the CLI ---------------------------------------------------------------------------------------
def test_cli_exit_codes(tok, tmp_path):
    from unmask.cli import CONVERT_TARGETS
    assert set(CONVERT_TARGETS) == set(supported())
    causal = _saved(_model(tok, "causal", token_shift=True), tmp_path / "ar")
    block = _saved(_model(tok, "block", token_shift=True), tmp_path / "bd")
    run = [sys.executable, "-m", "unmask.cli", "convert"]
    ok = subprocess.run([*run, str(causal), str(tmp_path / "llama"), "--to", "llama", "--dtype", "fp32"],
                        capture_output=True, text=True, cwd=REPO_ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "token_shift dropped" in ok.stderr
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    bad = subprocess.run([*run, str(block), str(tmp_path / "llada"), "--to", "llada"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "token_shift" in bad.stderr
    assert not (tmp_path / "llada").exists()


# ---- (6) every family fixture -> our layout -> its own layout ---------------------------------------------
@pytest.mark.skipif(not FIXTURE_DIRS, reason=f"{FIXTURES} is not there")
@pytest.mark.parametrize("fixture", FIXTURE_DIRS, ids=lambda p: p.name)
def test_family_fixture_round_trip(fixture, tmp_path):
    raw = json.loads((fixture / "config.json").read_text())
    model_type = raw["model_type"]
    orig = unmask.load(fixture)
    with safe_open(str(fixture / "reference_logits.safetensors"), framework="pt") as h:
        x = h.get_tensor("input_ids")
    ours_dir = convert(fixture, tmp_path / "ours")
    assert json.loads((ours_dir / "config.json").read_text())["model_type"] == "unmask"
    ours = unmask.load(ours_dir)
    assert ours.config.family == model_type
    assert ours.tokenizer.same_as(orig.tokenizer) and ours.tokenizer.special_ids == orig.tokenizer.special_ids
    want = orig.logits(x)
    assert torch.equal(ours.logits(x), want)
    back = convert(ours_dir, tmp_path / "back", to=model_type)
    again = unmask.load(back)
    assert again.config == orig.config
    assert torch.equal(again.logits(x), want)
    tpl = orig.family.chat_template(fixture)
    assert again.family.chat_template(back) == tpl
    # the family's own tensors, bit for bit (buffers we recompute, such as inv_freq, are not kept)
    got = _tensors(back)
    _bit_equal({k: v for k, v in _tensors(fixture).items() if k in got or not k.endswith("inv_freq")}, got)


# ---- (7) the shipped AR twin in transformers -------------------------------------------------------------
AR_TWIN = REPO_ROOT / "models" / "unmask-coder-ar"


@pytest.mark.skipif(not (AR_TWIN / "config.json").exists(), reason="the embedded AR twin is not there")
def test_shipped_ar_twin_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    start = time.perf_counter()
    out = convert(AR_TWIN, tmp_path / "ar-llama", to="llama", dtype="fp32")
    model = unmask.load(AR_TWIN)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = ["def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self", "for i in range(10):"]
    worst = 0.0
    for p in prompts:
        ids = torch.tensor([model.tokenizer.encode(p)])
        with torch.no_grad():
            theirs = hf(ids).logits
        ours = model.logits(ids)  # position i scores token i: the AR output at i - 1
        worst = max(worst, (ours[:, 1:] - theirs[:, :-1]).abs().max().item())
    print(f"unmask-coder-ar -> llama: transformers vs unmask max |diff| {worst:.2e} "
          f"({time.perf_counter() - start:.1f} s)")
    assert worst < TOL


def test_convert_to_gguf_file(tok, tmp_path, capsys):
    """DST ending in .gguf: our AR model as a llama GGUF (what llama.cpp runs), equal logits at F32,
    q8_0-sized at Q8_0; nothing left beside it but the file."""
    pytest.importorskip("gguf")
    from unmask.cli import main

    model = _model(tok, "causal")
    src = _saved(model, tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "g" / "m-f32.gguf"), "--gguf-type", "F32"]) == 0
    assert "GGUF, F32" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["m-f32.gguf"]
    back = unmask.load(tmp_path / "g" / "m-f32.gguf")
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert torch.allclose(back.logits(ids), unmask.load(src).logits(ids), atol=1e-5)
    q8 = convert(src, tmp_path / "g" / "m-q8.gguf", gguf_type="Q8_0")
    assert q8.stat().st_size < 0.4 * (tmp_path / "g" / "m-f32.gguf").stat().st_size
