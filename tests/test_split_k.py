"""The split-K engine (flash-decoding) against the float64 oracle, and KV-cache decoding reaching it.

The engine also runs the whole engine-parametrized suite (tests/test_engines.py); these
tests add decoding shapes: few queries, thousands of keys, GQA/MQA, left padding with
bottom-right causal, parts that do not divide the keys, rows and parts that see nothing.
Each runs on both kernels: the compiled C++ one ("split_k" on CPU tensors) and the Triton
ones of its CUDA path, in Triton's interpreter ("split_k_triton", registered by conftest).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import dotattn
from dotattn import engines, functional, masks
from dotattn._softmax import merge_into
from dotattn.engines import _tiled_kernel
from dotattn.engines import split_k as split_k_module
from dotattn.nn import KVCache, MultiHeadAttention
from dotattn.testing import assert_matches_oracle, oracle
from dotattn.engines.triton import MISSING as TRITON_MISSING
from tests.conftest import qkv

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


def _decoding_mask(lengths: list[int]) -> masks.Mask:
    """What a KVCache gives a step: real keys are the last lengths[b] of each row."""
    return masks.padding(torch.tensor(lengths), side="left") & masks.causal(align="bottom_right")


@pytest.fixture(params=["split_k", pytest.param("split_k_triton", marks=pytest.mark.skipif(
    TRITON_MISSING is not None, reason=str(TRITON_MISSING)))])
def engine(request) -> str:
    """Either kernel's engine name (conftest runs split_k_triton in Triton's interpreter)."""
    return request.param


@pytest.fixture
def split_k(engine):
    return engines.get(engine)


def _refuse(problem):
    raise AssertionError("split_k handed the problem to its fallback engine")


@pytest.fixture
def never_on_fallback(split_k, monkeypatch):
    """Fail a test whose problem would quietly run on the tiled or triton engine instead."""
    for fallback in (engines.get("tiled"), engines.get("triton")):
        monkeypatch.setattr(fallback, "forward", _refuse)


@pytest.mark.usefixtures("never_on_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq", [1, 3, 16])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_decoding_matches_the_oracle(engine, dtype, Lq, Hq, Hkv):
    Lk = 2053
    q, k, v = qkv(2, Hq, Lq, 64, Hkv=Hkv, Lk=Lk, dtype=dtype, seed=Lq)
    mask = _decoding_mask([Lk - 700, Lk])
    assert_matches_oracle(q, k, v, engine=engine, mask=mask, enable_gqa=True, backward=False)


def test_float64_is_exact_to_rounding(monkeypatch):
    monkeypatch.setattr(engines.get("tiled"), "forward", _refuse)  # the C++ kernel alone takes float64
    q, k, v = qkv(2, 8, 2, 24, Hkv=2, Lk=1500, dtype=torch.float64)
    mask = _decoding_mask([900, 1500])
    res = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine="split_k", return_lse=True)
    ref = oracle(q, k, v, mask=mask, enable_gqa=True)
    assert res.lse.dtype == torch.float64
    torch.testing.assert_close(res.output, ref.output, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.lse, ref.lse, atol=1e-12, rtol=0)


@pytest.mark.usefixtures("never_on_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [17, 128])
def test_no_mask_and_head_dims_the_vectors_do_not_divide(engine, dtype, E):
    q, k, v = qkv(1, 4, 2, E, Hkv=2, Lk=3000, Ev=E + 3, dtype=dtype)
    assert_matches_oracle(q, k, v, engine=engine, enable_gqa=True, backward=False)


@pytest.mark.usefixtures("never_on_fallback")
@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_read_in_place_in_any_layout(engine, dtype):
    """Broadcast batch dims, a transposed query, a key/value cache sliced from larger
    buffers, spans per batch row: the kernel reads them through their strides."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 64, 2, 8, generator=g).to(dtype).transpose(-1, -3)  # (3, 2, 8, 2, 64), E strided
    buffers = [torch.randn(1, 2, 2, 1500, 80, generator=g).to(dtype) for _ in range(2)]
    k, v = (b[..., :1300, :64] for b in buffers)  # (1, 2, 2, 1300, 64) views; dim 0 broadcasts
    mask = masks.padding(torch.tensor([1300, 400]), side="left") & masks.causal(align="bottom_right")
    assert not q.is_contiguous() and k.stride(-2) == 80
    assert_matches_oracle(q, k, v, engine=engine, mask=mask, enable_gqa=True, backward=False)


@pytest.mark.usefixtures("never_on_fallback")
@pytest.mark.parametrize("parts", [2, 7, 64])
def test_parts_that_do_not_divide_the_keys(engine, split_k, monkeypatch, parts):
    monkeypatch.setattr(split_k, "parts", lambda problem: parts)
    Lk = 1001
    q, k, v = qkv(3, 4, 2, 32, Hkv=2, Lk=Lk)
    # live keys per row: 1001, 1000, 5: parts of uneven size, and parts past a short row's keys
    assert_matches_oracle(q, k, v, engine=engine, mask=_decoding_mask([Lk, Lk - 1, 5]), enable_gqa=True,
                          backward=False)


def test_garbage_between_the_spans_of_a_block_of_rows_changes_nothing(engine):
    """The kernel runs rows four at a time over the union of their spans. Packed documents
    leave a gap in it: queries 0-1 see keys 0-1, queries 2-3 keys 4-5, and no query keys 2-3.
    NaN and inf there reach the block only as 0 · garbage, whose NaN sends the problem to the
    fallback engine, which gives exactly what the clean inputs give."""
    q, k, v = qkv(1, 1, 4, 16, Lk=6)
    mask = masks.documents(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert mask.row_spans(4, 6) is not None  # one span per query: split_k takes it
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[..., 2:4, :] = float("nan")
    dirty_v[..., 2, :], dirty_v[..., 3, :] = float("inf"), float("nan")
    clean, dirty = (dotattn.scaled_dot_product_attention(q, kk, vv, mask=mask, engine=engine, return_lse=True)
                    for kk, vv in ((k, v), (dirty_k, dirty_v)))
    torch.testing.assert_close(dirty.output, clean.output, atol=1e-6, rtol=0)
    torch.testing.assert_close(dirty.lse, clean.lse, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("never_on_fallback")
def test_rows_and_parts_that_see_nothing(engine, split_k, monkeypatch):
    monkeypatch.setattr(split_k, "parts", lambda problem: 5)
    q, k, v = qkv(2, 4, 4, 16, Hkv=2, Lk=1500)
    # batch row 1 has no real token at all; in row 0 the 3 queries before the last see nothing
    # besides the keys causal allows, and queries past the real ones are cut by q_lengths
    mask = masks.padding(torch.tensor([600, 0]), torch.tensor([2, 4]), side="left") & masks.causal(align="bottom_right")
    res = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine=engine, return_lse=True)
    ref = oracle(q, k, v, mask=mask, enable_gqa=True)
    dead = ref.lse == float("-inf")
    assert dead[1].all() and dead[0, :, :2].all() and not dead[0, :, 2:].any()
    assert (res.output[dead] == 0).all() and (res.lse[dead] == float("-inf")).all()
    torch.testing.assert_close(res.output, ref.output.float(), atol=1e-5, rtol=0)


def test_inputs_that_require_grad_run_on_the_fallback_engine_forward_and_backward(engine, split_k, monkeypatch):
    """The kernels are forward only, and a flash-style backward's recomputed scores must round as
    its forward's did: with grad the whole problem runs on the fallback engine, which explain
    names, and keeps the rule; without grad it runs on the kernel."""
    q, k, v = (x.requires_grad_() for x in qkv(2, 8, 3, 32, Hkv=2, Lk=1500))
    mask = _decoding_mask([900, 1500])
    fallback = engines.get("tiled" if engine == "split_k" else "triton")
    detail = dotattn.explain(q, k, v, mask=mask, enable_gqa=True, engine=engine).detail
    assert detail.startswith(f"runs on the {fallback.name} engine") and "requires grad" in detail
    ran = []
    real_forward = fallback.forward
    monkeypatch.setattr(fallback, "forward", lambda problem: ran.append(problem) or real_forward(problem))
    assert_matches_oracle(q, k, v, engine=engine, mask=mask, enable_gqa=True)
    assert ran
    with torch.no_grad():
        assert dotattn.explain(q, k, v, mask=mask, enable_gqa=True, engine=engine).detail.startswith("split-K")


@pytest.mark.usefixtures("never_on_fallback")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (32, 1)], ids=["4rows", "32rows"])  # rows per kv head
def test_garbage_in_the_left_padding_is_never_read(engine, bad, Hq, Hkv):
    q, k, v = qkv(2, Hq, 1, 32, Hkv=Hkv, Lk=1200)
    mask = _decoding_mask([700, 1200])
    clean = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine=engine)
    k[0, :, :500], v[0, :, :500] = bad, bad
    dirty = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine=engine)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("parts", [1, 4])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("Hq", [4, 32], ids=["6rows", "48rows"])  # rows per kv head
def test_garbage_a_row_may_see_shows_exactly_where_the_oracle_puts_it(engine, split_k, monkeypatch, where, parts, Hq):
    monkeypatch.setattr(split_k, "parts", lambda problem: parts)  # one part: no merge to see it
    q, k, v = qkv(1, Hq, 3, 16, Hkv=2, Lk=1100)
    x = k if where == "key" else v
    x[0, 1, 1098] = float("-inf")  # seen by the last two queries of kv head 1 only
    res = dotattn.scaled_dot_product_attention(q, k, v, is_causal=False, mask=_decoding_mask([1100]),
                                               enable_gqa=True, engine=engine)
    ref = oracle(q, k, v, mask=_decoding_mask([1100]), enable_gqa=True).output
    assert torch.equal(res.isnan(), ref.isnan()) and ref.isnan().any() and not ref[0, :2].isnan().any()
    torch.testing.assert_close(res[~ref.isnan()], ref[~ref.isnan()].float(), atol=1e-5, rtol=0)


def test_merge_into_equals_one_softmax_over_all_keys():
    q, k, v = qkv(1, 2, 3, 8, Lk=50, dtype=torch.float64)
    cuts = [0, 7, 7, 31, 50]  # one empty part, merged into the first and later into
    parts = [oracle(q, k[..., a:b, :], v[..., a:b, :]) for a, b in zip(cuts, cuts[1:])]
    out, lse = parts[0].output.clone(), parts[0].lse.clone()
    for p in parts[1:]:
        merge_into(out, lse, p.output, p.lse)
    whole = oracle(q, k, v)
    torch.testing.assert_close(out, whole.output, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, whole.lse, atol=1e-12, rtol=0)
    dead_out, dead_lse = torch.zeros(2, 4), torch.full((2,), float("-inf"))
    merge_into(dead_out, dead_lse, torch.zeros(2, 4), torch.full((2,), float("-inf")))
    assert (dead_out == 0).all() and (dead_lse == float("-inf")).all()
    seen = torch.zeros(2, 4)  # garbage a part saw reaches the row, even where its weight is 0
    merge_into(seen, torch.zeros(2), torch.full((2, 4), float("nan")), torch.full((2,), float("-inf")))
    assert seen.isnan().all()


def test_auto_picks_split_k_only_for_decoding_shapes():
    def chosen(Lq, Lk, **kwargs):
        q, k, v = qkv(1, 8, Lq, 16, Hkv=2, Lk=Lk)
        return dotattn.explain(q, k, v, enable_gqa=True, mask=_decoding_mask([Lk]), **kwargs)

    decoding = chosen(1, 4096)
    assert decoding.engine == "split_k" and "split-K kernel" in decoding.detail
    prefill = chosen(128, 4096)
    assert prefill.engine == "tiled" and "query rows per kv head" in prefill.rejected["split_k"][0]
    assert chosen(1, 16).engine == "split_k"  # a short cache too: it is faster at every length
    dropout = chosen(1, 4096, dropout_p=0.1)
    assert dropout.engine == "tiled" and "dropout" in dropout.rejected["split_k"][0]
    holes = torch.ones(4, 4096, dtype=torch.bool)
    holes[:, 100] = False  # rows that are not one run of keys
    forced = dotattn.explain(*qkv(1, 2, 4, 8, Lk=4096), mask=masks.dense(holes), engine="split_k")
    assert forced.engine == "split_k" and forced.detail.startswith("runs on the tiled engine")


@pytest.mark.skipif(_tiled_kernel.ext is None, reason="the compiled kernel is not built")
def test_auto_gives_split_k_the_rows_measured_faster_for_the_loaded_kernel_level():
    """A batch of short sequences (an encoder's) runs on split_k up to the loaded level's
    AUTO_MAX_ROWS (benchmarks/decode.py --crossover), above AUTO_SURE_ROWS only where this
    CPU's probe found split_k faster, and not one row beyond."""
    split_k = engines.get("split_k")
    most = split_k.auto_max_rows("cpu")
    level_most = split_k.AUTO_MAX_ROWS.get(_tiled_kernel.LEVEL, min(split_k.AUTO_MAX_ROWS.values()))
    probed = split_k_module._PROBED.get(level_most)
    assert most == (level_most if probed is None or probed >= 1 else split_k.AUTO_SURE_ROWS)

    def explained(L):
        q, k, v = qkv(3, 2, L, 16)
        return dotattn.explain(q, k, v, mask=masks.padding([L, L // 2, 1]))

    assert explained(most).engine == "split_k"
    beyond = explained(most + 1)
    assert beyond.engine != "split_k" and f"more than {most}" in beyond.rejected["split_k"][0]


@pytest.mark.skipif(_tiled_kernel.ext is None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("ratio", [0.7, 1.4], ids=["tiled_faster", "split_k_faster"])
def test_above_the_sure_rows_the_probe_of_this_cpu_decides(monkeypatch, ratio):
    split_k = engines.get("split_k")
    monkeypatch.setattr(split_k, "AUTO_MAX_ROWS", {_tiled_kernel.LEVEL: 128})
    monkeypatch.setattr(split_k_module, "_PROBED", {})
    monkeypatch.setattr(split_k, "probe", lambda rows: ratio)
    assert split_k.auto_max_rows("cpu") == (128 if ratio > 1 else split_k.AUTO_SURE_ROWS)
    q, k, v = qkv(1, 2, 100, 16)
    explanation = dotattn.explain(q, k, v)
    assert (explanation.engine == "split_k") == (ratio > 1)
    if ratio < 1:
        assert "timed on this CPU at 128 rows, split_k ran 1.43x tiled's time" in explanation.rejected["split_k"][0]


@pytest.mark.skipif(_tiled_kernel.ext is None, reason="the compiled kernel is not built")
def test_the_probe_times_both_kernels_on_this_cpu():
    ratio = engines.get("split_k").probe(32)
    assert 0 < ratio < float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_decoding_runs_on_split_k(monkeypatch, dtype):
    """MultiHeadAttention decoding with a KVCache reaches split_k through engine='auto', and
    gives what the tiled engine gives."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8, num_kv_heads=2, dtype=dtype).eval()
    cache = m.new_cache(2, capacity=1100)
    prompt = torch.randn(2, 1090, 64, dtype=dtype)
    prompt[1, :300] = float("nan")  # left padding holds garbage
    ran = []  # the query length of each call split_k ran, down the full path or as the one-call step
    split_k = engines.get("split_k")
    real_run, real_step = split_k.run, split_k_module._STEP
    monkeypatch.setattr(split_k, "run", lambda problem: ran.append(problem.Lq) or real_run(problem))

    def step(q, *args):
        out = real_step(q, *args)
        if out is not None:
            ran.append(q.shape[-2])
        return out

    if real_step is not None:
        monkeypatch.setattr(split_k_module, "_STEP", step)
    with torch.no_grad():
        m(prompt, cache=cache, lengths=torch.tensor([1090, 790]))  # prefill: 1090 queries, tiled
        step = torch.randn(2, 1, 64, dtype=dtype)
        cache_after_prefill = (cache.k.clone(), cache.v.clone(), cache.lengths.clone(), cache.filled)
        out = m(step, cache=cache)
        assert ran == [1]  # the decoding step, not the prefill
        cache.k, cache.v, cache.lengths, cache.filled = cache_after_prefill
        expected = m(step, cache=cache, engine="tiled")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_a_kv_cache_step_is_explained_as_split_k():
    cache = KVCache(2, 2, capacity=4096, head_dim=16)
    k, v = torch.randn(2, 2, 3000, 16), torch.randn(2, 2, 3000, 16)
    cache.append(k, v, lengths=[3000, 1200])
    keys, values, mask = cache.append(k[:, :, :1], v[:, :, :1])
    explanation = dotattn.explain(torch.randn(2, 8, 1, 16), keys, values, mask=mask, enable_gqa=True)
    assert explanation.engine == "split_k", str(explanation)


# ---------------------------------------------------------------------------
# The eager step: a decoding step's usual call in one call of the kernel
# ---------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(_tiled_kernel.ext is None, reason="the compiled kernel is not built")


@pytest.fixture
def full_path_calls(monkeypatch) -> list[int]:
    """Counts the calls that go down the full path (prepare, select, run)."""
    calls: list[int] = []
    real = functional.prepare
    monkeypatch.setattr(functional, "prepare", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _full_path(*args, **kwargs) -> torch.Tensor:
    """The same call down the full path (asking for the lse sends it there)."""
    return dotattn.scaled_dot_product_attention(*args, return_lse=True, **kwargs).output


_STEP_MASKS = {
    "none": lambda B: {},
    "is_causal": lambda B: dict(is_causal=True),
    "top_left": lambda B: dict(mask=masks.causal()),
    "bottom_right": lambda B: dict(mask=masks.causal(align="bottom_right")),
    "left_padding": lambda B: dict(mask=masks.padding(torch.tensor([37, 20][:B]), side="left")),
    "right_padding_int32": lambda B: dict(mask=masks.padding(torch.tensor([5, 37][:B], dtype=torch.int32))),
    "kv_cache": lambda B: dict(mask=_decoding_mask([30, 37][:B])),
    "right_padding_is_causal": lambda B: dict(mask=masks.padding([0, 36][:B]), is_causal=True),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float64, id="float64")])
@pytest.mark.parametrize("Hq,Hkv,gqa", [(8, 2, True), (8, 1, False), (4, 4, False)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("batch", [(2,), (1,), ()], ids=["4d", "batch1", "3d"])
@pytest.mark.parametrize("mask", list(_STEP_MASKS))
def test_the_usual_decoding_step_is_one_kernel_call_with_the_full_paths_output(
        full_path_calls, dtype, Hq, Hkv, gqa, Lq, batch, mask):
    if batch == () and ("padding" in mask or mask == "kv_cache"):
        pytest.skip("a padding mask needs a batch dim (the full path says so)")
    q, k, v = qkv(batch, Hq, Lq, 64, Hkv=Hkv, Lk=37, dtype=dtype)
    kwargs = dict(enable_gqa=gqa, **_STEP_MASKS[mask](batch[0] if batch else 1))
    expected = _full_path(q, k, v, **kwargs)
    full_path_calls.clear()
    out = dotattn.scaled_dot_product_attention(q, k, v, **kwargs)
    assert not full_path_calls
    assert out.dtype == dtype and torch.equal(out, expected)


@needs_kernel
def test_the_eager_step_takes_scale_softcap_any_key_layout_and_a_forced_engine(full_path_calls):
    q, k, v = qkv(2, 8, 1, 32, Hkv=2, Lk=300)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous: copied
    rows = engines.get("split_k").auto_max_rows("cpu") + 1
    many = qkv(1, 2, rows, 32, Hkv=1, Lk=50)  # more rows than auto gives split_k: forced takes them
    calls = [((q, k, v), dict(enable_gqa=True, scale=0.3, softcap=20.0)),
             (many, dict(engine="split_k")),
             (many, dict(engine="split_k", mask=masks.causal(align="bottom_right")))]
    for args, kwargs in calls:
        expected = _full_path(*args, **kwargs)
        full_path_calls.clear()
        out = dotattn.scaled_dot_product_attention(*args, **kwargs)
        assert not full_path_calls, kwargs
        assert torch.equal(out, expected)
    torch.testing.assert_close(out, oracle(*many, mask=masks.causal(align="bottom_right")).output.float(),
                               atol=1e-5, rtol=0)


def _nan_in_a_key_row_2_sees(q, k, v):
    k = k.clone()
    k[..., 2, 0] = float("nan")
    return (q, k, v), dict(is_causal=True)


# Calls the eager step passes on, each with why: the full path decides, raises or reruns them.
_NOT_THE_STEP = {
    "requires grad": lambda q, k, v: ((q.requires_grad_(), k, v), {}),
    "engine tiled": lambda q, k, v: ((q, k, v), dict(engine="tiled")),
    "scope tiled": lambda q, k, v: ((q, k, v), dict(scope="tiled")),
    "float16": lambda q, k, v: ((q.half(), k.half(), v.half()), {}),
    "2-D": lambda q, k, v: ((q[0, 0], k[0, 0], v[0, 0]), {}),
    "broadcast batch": lambda q, k, v: ((q, k[:1], v[:1]), {}),
    "padding with query lengths": lambda q, k, v: ((q, k, v), dict(mask=masks.padding([5, 3], [2, 3]))),
    "padding and a window": lambda q, k, v: ((q, k, v), dict(mask=masks.padding([5, 3]) & masks.sliding_window(2))),
    "causal and is_causal": lambda q, k, v: ((q, k, v), dict(mask=masks.causal(), is_causal=True)),
    "dropout": lambda q, k, v: ((q, k, v), dict(dropout_p=0.5)),
    "int scale": lambda q, k, v: ((q, k, v), dict(scale=1)),
    "empty": lambda q, k, v: ((q, k[..., :0, :], v[..., :0, :]), {}),
    "garbage a row sees": _nan_in_a_key_row_2_sees,
    "recording monitor": lambda q, k, v: ((q, k, v), dict(monitor=True)),
}


@needs_kernel
@pytest.mark.parametrize("case", list(_NOT_THE_STEP))
def test_calls_that_are_not_the_usual_step_go_down_the_full_path(full_path_calls, case):
    from dotattn import diagnostics

    args, kwargs = _NOT_THE_STEP[case](*qkv(2, 4, 3, 16, Lk=8))
    scope, monitor = kwargs.pop("scope", "auto"), kwargs.pop("monitor", False)
    with engines.use_engine(scope), diagnostics.Monitor() if monitor else contextlib.nullcontext():
        out = dotattn.scaled_dot_product_attention(*args, **kwargs)
    assert full_path_calls
    if case == "garbage a row sees":  # the rerun marks row 2 alone, as the oracle does
        assert out[..., :2, :].isfinite().all() and out[..., 2, :].isnan().all()


_BAD_STEPS = {
    "unknown engine": (lambda q, k, v: ((q, k, v), dict(engine="nope", enable_gqa=True)), "unknown engine"),
    "bool flag": (lambda q, k, v: ((q, k, v), dict(is_causal=1, enable_gqa=True)), "is_causal"),
    "head count": (lambda q, k, v: ((q, k, v), {}), "enable_gqa"),
    "padding longer than the keys": (lambda q, k, v: ((q, k, v), dict(mask=masks.padding([5, 9]), enable_gqa=True)),
                                     "kv_lengths"),
    "padding of another batch size": (lambda q, k, v: ((q, k, v), dict(mask=masks.padding([5, 3, 2]),
                                                                          enable_gqa=True)), "leading shape"),
    "padding on 3-D inputs": (lambda q, k, v: ((q[0], k[0], v[0]), dict(mask=masks.padding([5]), enable_gqa=True)),
                              "leading shape"),
}


@needs_kernel
@pytest.mark.parametrize("bad", list(_BAD_STEPS))
def test_bad_calls_raise_the_full_paths_errors(bad):
    build, message = _BAD_STEPS[bad]
    args, kwargs = build(*qkv(2, 4, 1, 16, Hkv=2, Lk=8))
    with pytest.raises((ValueError, TypeError), match=message):
        dotattn.scaled_dot_product_attention(*args, **kwargs)
