"""dotattn.nn: MultiHeadAttention against torch's, grouped-query heads, rotary embeddings, KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from dotattn import masks
from dotattn.nn import KVCache, MultiHeadAttention, RotaryEmbedding
from dotattn.testing import oracle


def _in_torch_layout(m: MultiHeadAttention, packed: bool) -> dict[str, torch.Tensor]:
    """Our parameters' gradients named and packed as torch.nn.MultiheadAttention holds them."""
    projections = (m.q_proj, m.k_proj, m.v_proj)
    grads = {"out_proj.weight": m.out_proj.weight.grad}
    if packed:
        grads["in_proj_weight"] = torch.cat([p.weight.grad for p in projections])
    else:
        grads.update({f"{n}_proj_weight": p.weight.grad for n, p in zip("qkv", projections)})
    if m.out_proj.bias is not None:
        grads["in_proj_bias"] = torch.cat([p.bias.grad for p in projections])
        grads["out_proj.bias"] = m.out_proj.bias.grad
    return grads


@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (24, 40, True), (None, None, False)],
                         ids=["self", "cross-kdim-vdim", "no-bias"])
def test_from_torch_gives_torchs_outputs_weights_and_gradients(kdim, vdim, bias):
    torch.manual_seed(0)
    B, Lq, Lk, D, H = 3, 9, 11, 32, 4
    ref = torch.nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=vdim, bias=bias).double()
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(B, Lq, D, dtype=torch.float64, requires_grad=True)
    kv_k = torch.randn(B, Lk, kdim or D, dtype=torch.float64, requires_grad=True)
    kv_v = torch.randn(B, Lk, vdim or D, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(Lk) >= torch.tensor([Lk, 6, 3])[:, None]  # (B, Lk) True = ignore
    blocked = torch.rand(Lq, Lk, generator=torch.Generator().manual_seed(1)) > 0.8  # torch: True = blocked
    blocked[:, 0] = False  # every row keeps a key, so torch gives no NaN to compare

    out_ref, w_ref = ref(x, kv_k, kv_v, key_padding_mask=padding, attn_mask=blocked, average_attn_weights=False)
    input_grads_ref = torch.autograd.grad(out_ref.square().sum(), (x, kv_k, kv_v, *ref.parameters()))
    out, w = ours(x, kv_k, kv_v, key_padding_mask=padding, attn_mask=~blocked, need_weights=True)
    input_grads = torch.autograd.grad(out.square().sum(), (x, kv_k, kv_v), retain_graph=True)
    out.square().sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-12)
    assert torch.allclose(w, w_ref, atol=1e-12)
    for g, g_ref in zip(input_grads, input_grads_ref[:3]):
        assert torch.allclose(g, g_ref, atol=1e-10)
    ours_grads = _in_torch_layout(ours, packed=kdim is None)
    names = [name for name, _ in ref.named_parameters()]
    assert sorted(ours_grads) == sorted(names)
    for name, g_ref in zip(names, input_grads_ref[3:]):
        assert torch.allclose(ours_grads[name], g_ref, atol=1e-10), name


def test_from_torch_rejects_what_it_cannot_copy():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))


def _manual_attention(m: MultiHeadAttention, x: torch.Tensor, mask: masks.Mask | None) -> torch.Tensor:
    """The module's computation spelled out with K/V heads repeated, through the oracle."""
    B, L, _ = x.shape
    G = m.num_heads // m.num_kv_heads
    q = m.q_proj(x).view(B, L, m.num_heads, m.head_dim).transpose(1, 2)
    k = m.k_proj(x).view(B, L, m.num_kv_heads, m.head_dim).transpose(1, 2).repeat_interleave(G, dim=1)
    v = m.v_proj(x).view(B, L, m.num_kv_heads, m.head_dim).transpose(1, 2).repeat_interleave(G, dim=1)
    if m.rope is not None:
        pos = torch.arange(L)
        q, k = m.rope(q, pos), m.rope(k, pos)
    out = oracle(q, k, v, mask=mask).output
    return m.out_proj(out.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rope", [False, True])
def test_grouped_query_heads_and_rope_match_the_spelled_out_computation(Hkv, rope):
    torch.manual_seed(0)
    m = MultiHeadAttention(48, 4, num_kv_heads=Hkv, head_dim=10, rope=RotaryEmbedding(8) if rope else None).double()
    assert m.k_proj.out_features == Hkv * 10
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    for mask in (None, masks.causal() & masks.sliding_window(4)):
        got = m(x, mask=mask)
        assert torch.allclose(got, _manual_attention(m, x, mask), atol=1e-12)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(p: int, p_: int) -> float:
        return float((rope(q, torch.tensor([p])) * rope(k, torch.tensor([p_]))).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-12)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-6)
    assert torch.equal(rope(q, torch.tensor([0])), q)  # position 0 is the identity


def test_rope_matches_the_complex_rotation():
    rope = RotaryEmbedding(8, base=100.0)
    x = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
    got = rope(x, pos)
    freq = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.complex(x[..., :4], x[..., 4:8]) * torch.polar(torch.ones((), dtype=torch.float64), pos[:, None, :, None] * freq)
    assert torch.allclose(got[..., :8], torch.cat([z.real, z.imag], -1), atol=1e-12)
    assert torch.equal(got[..., 8:], x[..., 8:])


@pytest.mark.parametrize("Hkv,rope", [(4, False), (2, True), (1, True)], ids=["mha", "gqa-rope", "mqa-rope"])
def test_kv_cache_decoding_equals_one_causal_forward(Hkv, rope):
    """Left-padded prompts of different lengths, prefilled then decoded token by token, give
    each row what one causal forward over that row alone gives."""
    torch.manual_seed(0)
    D, T_new = 32, 5
    m = MultiHeadAttention(D, 4, num_kv_heads=Hkv, rope=RotaryEmbedding(8) if rope else None).double().eval()
    prompt_lengths = [6, 2, 4]
    P = max(prompt_lengths)
    rows = [torch.randn(n + T_new, D, dtype=torch.float64) for n in prompt_lengths]
    prompt = torch.zeros(3, P, D, dtype=torch.float64)
    for b, n in enumerate(prompt_lengths):
        prompt[b, P - n:] = rows[b][:n]
        prompt[b, : P - n] = float("nan")  # garbage in the padding must not leak

    cache = m.new_cache(3, capacity=P + T_new)
    outs = [m(prompt, cache=cache, lengths=torch.tensor(prompt_lengths))]
    for t in range(T_new):
        step = torch.stack([rows[b][n + t] for b, n in enumerate(prompt_lengths)])[:, None]
        outs.append(m(step, cache=cache))
    decoded = torch.cat(outs, dim=1)  # (3, P + T_new, D)
    assert cache.lengths.tolist() == [n + T_new for n in prompt_lengths] and cache.filled == P + T_new

    for b, n in enumerate(prompt_lengths):
        alone = m(rows[b][None], is_causal=True)[0]
        assert torch.allclose(decoded[b, P - n:], alone, atol=1e-12)
        assert torch.equal(decoded[b, : P - n], m.out_proj.bias.expand(P - n, D))  # padded queries see nothing


def test_kv_cache_mask_leaves_out_padding_until_a_row_is_padded():
    cache = KVCache(2, 1, capacity=8, head_dim=3)
    k = torch.randn(2, 1, 3, 3)
    for lengths in (None, [1, 1]):  # every row real: the padding term would allow everything
        *_, mask = cache.append(k[:, :, :1], k[:, :, :1], lengths)
        assert repr(mask) == "causal(bottom_right)"
    with_padding = masks.padding(cache.lengths, side="left") & masks.causal(align="bottom_right")
    assert torch.equal(with_padding.to_dense(1, 2), mask.to_dense(1, 2).expand(2, 1, 1, 2))
    cache.reset()
    *_, mask = cache.append(k, k, lengths=[3, 1])
    *_, mask = cache.append(k[:, :, :1], k[:, :, :1])
    assert cache.padded and repr(mask).startswith("padding(")


def test_kv_cache_errors_name_the_problem():
    cache = KVCache(2, 1, capacity=4, head_dim=3)
    k = torch.zeros(2, 1, 3, 3)
    cache.append(k, k, lengths=[3, 1])
    with pytest.raises(ValueError, match="overflow the capacity 4"):
        cache.append(k, k)
    with pytest.raises(ValueError, match="only a row's first step may be left-padded"):
        cache.append(k[:, :, :1], k[:, :, :1], lengths=[0, 1])
    with pytest.raises(ValueError, match=r"do not fit"):
        cache.append(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3))
    cache.reset()
    assert cache.filled == 0 and cache.lengths.tolist() == [0, 0]


def test_need_weights_gives_per_head_weights_that_respect_the_mask():
    m = MultiHeadAttention(16, 2)
    x = torch.randn(2, 6, 16)
    out, w = m(x, is_causal=True, need_weights=True, key_padding_mask=torch.arange(6) >= torch.tensor([[6], [4]]))
    assert out.shape == (2, 6, 16) and w.shape == (2, 2, 6, 6)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 6))
    assert float(w.triu(1).abs().max()) == 0.0 and float(w[1, :, :, 4:].abs().max()) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"embed_dim": 30, "num_heads": 4}, "not divisible by num_heads 4"),
     ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, r"multiple of num_kv_heads \(3\)"),
     ({"embed_dim": 32, "num_heads": 4, "dropout": 1.0}, "dropout must be in"),
     ({"embed_dim": 32, "num_heads": 4, "rope": 8}, "RotaryEmbedding")],
)
def test_bad_configurations_raise_with_the_value(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadAttention(**kwargs)
