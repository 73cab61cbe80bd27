"""The transformer: shapes, GQA, tying, attention modes, explicit masks, slicing, absolute positions."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from unmask.model import Transformer, block_causal_mask
from unmask.model.masks import causal_mask

pytestmark = pytest.mark.usefixtures("single_thread")

V = 40
L = 10  # not a multiple of block_size 4


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(**overrides)).eval()


def twin(model: Transformer, **overrides) -> Transformer:
    """A model with the same weights but another config (e.g. attention mode)."""
    cfg = model.config.model_copy(update=overrides)
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the combination
    other = Transformer(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def tokens(b=2, t=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (b, t), generator=g)


def perturbed(x, j):
    y = x.clone()
    y[:, j] = 3 + (x[:, j] - 3 + 7) % (V - 3)  # a different non-special token
    assert (y[:, j] != x[:, j]).all()
    return y


def changed_positions(model, x, j, tol=1e-6):
    with torch.no_grad():
        a, b = model(x), model(perturbed(x, j))
    diff = (a - b).abs().amax(dim=(0, 2))  # (T,)
    return diff > tol, diff


# ---- shapes, dtypes, GQA, tying ---------------------------------------------------------------

@pytest.mark.parametrize("attention", ["full", "block", "causal"])
def test_shapes_and_dtype(attention):
    m = make_model(attention=attention)
    x = tokens(3, 7)
    out = m(x)
    assert out.shape == (3, 7, V)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_bf16_model_returns_float32_logits():
    m = make_model().to(torch.bfloat16)
    out = m(tokens())
    assert out.dtype == torch.float32 and out.shape == (2, L, V)


def test_gqa():
    m = make_model(n_heads=4, n_kv_heads=2)
    attn = m.layers[0].attn
    hd = m.config.head_dim
    assert attn.k_proj.weight.shape == (2 * hd, 32)
    assert attn.q_proj.weight.shape == (4 * hd, 32)
    x = tokens()
    out = m(x)
    assert out.shape == (2, L, V) and torch.isfinite(out).all()
    # GQA keeps the attention mode: block mode still hides later blocks.
    changed, _ = changed_positions(m, x, 9)
    assert not changed[:8].any() and changed[8:].all()
    # GQA equals MHA with the kv heads repeated (the semantics of enable_gqa).
    mha = make_model(n_heads=4, n_kv_heads=None)
    sd = m.state_dict()
    for i in range(m.config.n_layers):
        for p in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.attn.{p}.weight"].view(2, hd, 32)
            sd[f"layers.{i}.attn.{p}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(sd)
    torch.testing.assert_close(mha(x), out, atol=1e-5, rtol=1e-5)


def test_invalid_gqa_rejected():
    with pytest.raises(ValueError):
        tiny_config(n_heads=4, n_kv_heads=3)


def test_tied_embeddings_share_storage():
    m = make_model(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight
    assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
    with torch.no_grad():
        m.embed.weight[5, 0] = 123.0
    assert m.lm_head.weight[5, 0] == 123.0
    u = make_model(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.embed.weight.data_ptr()
    assert m.num_params(non_embedding=False) == u.num_params(non_embedding=False) - V * 32


# ---- attention modes --------------------------------------------------------------------------

@pytest.mark.parametrize("j", range(L))
def test_causal_mode(j):
    m = make_model(attention="causal")
    changed, diff = changed_positions(m, tokens(), j)
    assert (diff[:j] == 0).all(), diff
    assert changed[j:].all(), diff


@pytest.mark.parametrize("j", range(L))
def test_block_mode(j):
    m = make_model(attention="block", block_size=4)
    changed, diff = changed_positions(m, tokens(), j)
    start = (j // 4) * 4
    assert (diff[:start] == 0).all(), diff  # earlier blocks see nothing of token j
    assert changed[start:].all(), diff  # its own block (both directions) and all later blocks


@pytest.mark.parametrize("j", range(L))
def test_full_mode(j):
    m = make_model(attention="full")
    changed, diff = changed_positions(m, tokens(), j)
    assert changed.all(), diff


def test_block_size_one_is_causal():
    m = make_model(attention="block", block_size=1)
    c = twin(m, attention="causal", objective="ar")
    x = tokens()
    torch.testing.assert_close(m(x), c(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bs", [L, 16])
def test_block_size_ge_length_is_full(bs):
    m = make_model(attention="block", block_size=bs)
    f = twin(m, attention="full", objective="mdlm")
    x = tokens()
    torch.testing.assert_close(m(x), f(x), atol=1e-5, rtol=1e-5)
    # ...and smaller blocks are not (the check above can fail)
    small = twin(m, block_size=4)
    assert not torch.allclose(small(x), f(x), atol=1e-5)


# ---- explicit masks, slicing, positions -------------------------------------------------------

@pytest.mark.parametrize("attention", ["full", "block", "causal"])
@pytest.mark.parametrize("mask_dim", [2, 3, 4])
def test_explicit_mask_equals_default(attention, mask_dim):
    m = make_model(attention=attention)
    x = tokens()
    pos = torch.arange(L)
    mask = {
        "full": torch.ones(L, L, dtype=torch.bool),
        "causal": causal_mask(pos, pos),
        "block": block_causal_mask(pos, pos, 4),
    }[attention]
    if mask_dim >= 3:
        mask = mask.expand(2, L, L)
    if mask_dim == 4:
        mask = mask.unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(m(x, attn_mask=mask), m(x), atol=1e-5, rtol=1e-5)
        # a different explicit mask gives different logits (the mask is really used)
        if attention != "full":
            assert not torch.allclose(m(x, attn_mask=torch.ones(L, L, dtype=torch.bool)), m(x), atol=1e-5)


def test_block_mask_aligned_at_absolute_positions():
    pos = torch.tensor([6, 7, 8, 9])
    m = block_causal_mask(pos, pos, 4)
    # 6,7 are block 1; 8,9 are block 2
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("attention", ["full", "block", "causal"])
@pytest.mark.parametrize("lo,hi", [(0, None), (3, None), (0, 4), (2, 7), (L - 1, L)])
def test_logits_slice(attention, lo, hi):
    m = make_model(attention=attention)
    x = tokens()
    with torch.no_grad():
        full = m(x)
        part = m(x, logits_from=lo, logits_to=hi)
    torch.testing.assert_close(part, full[:, lo:hi], atol=1e-6, rtol=1e-6)


def test_positions_beyond_max_seq_len_raise():
    m = make_model(max_seq_len=16)
    m(tokens(1, 16))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        m(tokens(1, 17))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(tokens(1, 4), positions=torch.arange(13, 17))


@pytest.mark.parametrize("explicit", [False, True])
def test_forward_compiles_without_a_graph_break(explicit):
    """The max_seq_len check is a host sync: under torch.compile it must not split the training
    forward in two (the BD3-LM loss passes explicit positions, the AR loss none)."""
    m = make_model(attention="causal")
    kwargs = {"positions": torch.arange(L)} if explicit else {}
    torch._dynamo.reset()
    report = torch._dynamo.explain(m)(tokens(), **kwargs)
    assert report.graph_break_count == 0, report.break_reasons


def test_explicit_default_positions_match():
    m = make_model()
    x = tokens()
    torch.testing.assert_close(m(x, positions=torch.arange(L)), m(x))
    torch.testing.assert_close(m(x, positions=torch.arange(L).expand(2, L)), m(x))


@pytest.mark.parametrize("attention", ["full", "causal"])
def test_rope_is_relative(attention):
    """Shifting every position by the same offset leaves the logits unchanged (RoPE on q and k),
    while reordering positions does not."""
    m = make_model(attention=attention)
    x = tokens()
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(m(x, positions=torch.arange(L) + 17), ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(m(x, positions=torch.arange(L) * 3), ref, atol=1e-4)


def test_kv_cache_requires_explicit_mask():
    m = make_model()
    with pytest.raises(ValueError, match="attn_mask"):
        m(tokens(), kv_cache=DictKVCache())


class DictKVCache:
    """The smallest KVCache: per layer, keep every key/value seen and attend to all of them."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer, k, v):
        if layer in self.k:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        else:
            self.k[layer], self.v[layer] = k, v
        return self.k[layer], self.v[layer]


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("split", [1, 4, 7])
def test_suffix_with_kv_cache_matches_full_causal(n_kv_heads, split):
    m = make_model(attention="causal", n_kv_heads=n_kv_heads)
    x = tokens()
    with torch.no_grad():
        ref = m(x)
        cache = DictKVCache()
        pre = torch.arange(split)
        m(x[:, :split], positions=pre, attn_mask=causal_mask(pre, pre), kv_cache=cache)
        assert cache.k[0].shape[2] == split
        suf = torch.arange(split, L)
        out = m(x[:, split:], positions=suf, attn_mask=causal_mask(suf, torch.arange(L)), kv_cache=cache)
    torch.testing.assert_close(out, ref[:, split:], atol=1e-5, rtol=1e-5)
    # without the absolute positions the suffix logits are wrong: RoPE really uses them
    with torch.no_grad():
        cache2 = DictKVCache()
        m(x[:, :split], positions=pre, attn_mask=causal_mask(pre, pre), kv_cache=cache2)
        wrong = m(x[:, split:], positions=torch.arange(L - split),
                  attn_mask=causal_mask(suf, torch.arange(L)), kv_cache=cache2)
    assert not torch.allclose(wrong, ref[:, split:], atol=1e-5)


def test_block_query_against_kv_cache_matches_block_forward():
    """The block-diffusion decode shape: prefill whole blocks, then forward one block against the cache."""
    m = make_model(attention="block", block_size=4)
    x = tokens(2, 12)
    with torch.no_grad():
        ref = m(x)
        cache = DictKVCache()
        pre = torch.arange(8)
        m(x[:, :8], positions=pre, attn_mask=block_causal_mask(pre, pre, 4), kv_cache=cache)
        q = torch.arange(8, 12)
        out = m(x[:, 8:], positions=q, attn_mask=block_causal_mask(q, torch.arange(12), 4), kv_cache=cache)
    torch.testing.assert_close(out, ref[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_packed_forward_equals_padded(token_shift, n_kv_heads):
    """A ragged batch left-padded to T: running norms, projections and the MLP on the real tokens
    only (packed) gives the padded forward's logits at every real position."""
    model = make_model(token_shift=token_shift, n_kv_heads=n_kv_heads)
    lengths = [L, 3, 7]
    B = len(lengths)
    ids, pos = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = tokens(1, n, seed=i)[0]
        ids[i, L - n + 1] = model.config.mask_token_id  # token_shift acts on [MASK] inputs
        pos[i, L - n:] = torch.arange(n)
        real[i, L - n:] = True
    mask = block_causal_mask(pos, pos, 4) & real[:, None, :] & real[:, :, None]
    mask[:, :, 0] |= ~real  # padded queries see one key, as the engine arranges
    at = torch.stack([torch.arange(L - 2, L)] * B)  # the last two positions of every row are real
    padded = model(ids, positions=pos, attn_mask=mask, logits_at=at)
    packed = model(ids, positions=pos, attn_mask=mask, logits_at=at, packed=real.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    # Without logits_at, every position of the slice is returned; real ones must agree.
    full_padded = model(ids, positions=pos, attn_mask=mask)
    full_packed = model(ids, positions=pos, attn_mask=mask, packed=real.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(full_packed[real], full_padded[real], rtol=1e-5, atol=1e-5)
