"""dotattn and torch SDPA, eager and under torch.compile (Inductor), side by side in one run.

    python -m benchmarks.compile            # B1 H8 L1024 E64 float32, a decoding step, a small Llama step
    python -m benchmarks.compile --quick    # fewer repeats, L 512
    python -m benchmarks.compile --decode   # the decoding steps alone
    python -m benchmarks.compile --guards   # the 16-key step's guards: how many, and their check time

Under torch.compile, dotattn is one ``dotattn::attention`` operator (``dotattn._ops``) that
Inductor leaves whole, with Inductor compiling what surrounds it; torch's SDPA is lowered
by Inductor itself. Each case times four functions interleaved (``dotattn.benchmarking.timed``:
median seconds per call): dotattn eager, dotattn compiled, torch eager, torch compiled, and
reports compile time (the first call of each compiled function, with Inductor's FX graph
cache off; its C++ kernel cache on disk may still hold code from an earlier run). The rows:

    full / causal / window256   one attention call, forward, and forward+backward
    decode                      one query per head (32 heads, 8 kv heads, E 128) against a KV cache
                                of 16 and 2048 keys (its mask), as a generation step makes it
    static                      the same step into a static cache of 8192 slots, 512 filled, its
                                mask the bool tensor of the filled slots (``--static``: this alone)
    llama step                  a 2-layer Llama (hidden 256, 8 heads / 2 kv heads) forward, L as above
    guards                      the compiled 16-key step's guard tree (dotattn's, torch's, and that of a
                                bare ``dotattn::split_k`` call), in lines, and the median time of its
                                check, warm (back to back) and cold (after writing 16 MiB elsewhere)

GFLOP/s counts 4·B·H·Lq·Lk·E for a forward (2.5x that for forward+backward), all pairs,
so masked cases show the useful rate of a dense call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dotattn
from dotattn import masks
from dotattn.benchmarking import timed
from dotattn.nn import KVCache


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def _first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(name: str, flops: float, fns: dict, repeats: int) -> None:
    compile_s = {label: _first_call_seconds(fn) for label, fn in fns.items() if "compiled" in label}
    seconds = dict(zip(fns, timed(list(fns.values()), repeats)))
    base = seconds["torch eager"]
    cells = "  ".join(f"{label} {1e3 * s:8.4g} ms ({base / s:4.2f}x)" for label, s in seconds.items())
    rate = f"{flops / seconds['dotattn compiled'] / 1e9:6.1f} GFLOP/s compiled" if flops else ""
    print(f"{name:22s} {cells}  {rate}")
    print(f"{'':22s} compile: " + ", ".join(f"{label} {s:.1f} s" for label, s in compile_s.items()))


def attention_cases(L: int, repeats: int) -> None:
    B, H, E = 1, 8, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    flops = 4 * B * H * L * L * E
    for name, ours_kwargs, torch_kwargs in [
        ("full", {}, {}),
        ("causal", {"is_causal": True}, {"is_causal": True}),
        ("window256", {"mask": masks.causal() & masks.sliding_window(256)},
         {"attn_mask": (masks.causal() & masks.sliding_window(256)).to_dense(L, L)}),
    ]:
        def ours(q, k, v, kw=ours_kwargs):
            return dotattn.scaled_dot_product_attention(q, k, v, **kw)

        def theirs(q, k, v, kw=torch_kwargs):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

        ours_c, theirs_c = _compiled(ours), _compiled(theirs)
        with torch.no_grad():
            _row(f"{name} forward", flops, {
                "dotattn eager": lambda: ours(q, k, v), "dotattn compiled": lambda: ours_c(q, k, v),
                "torch eager": lambda: theirs(q, k, v), "torch compiled": lambda: theirs_c(q, k, v)}, repeats)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]

        def step(fn):
            return lambda: fn(*leaves).sum().backward()

        _row(f"{name} fwd+bwd", 2.5 * flops, {
            "dotattn eager": step(ours), "dotattn compiled": step(_compiled(ours)),
            "torch eager": step(theirs), "torch compiled": step(_compiled(theirs))}, repeats)


def decode_case(L: int, repeats: int) -> None:
    B, Hq, Hkv, E = 1, 32, 8, 128
    cache = KVCache(B, Hkv, capacity=L + 1, head_dim=E)
    g = torch.Generator().manual_seed(0)
    cache.append(torch.randn(B, Hkv, L, E, generator=g), torch.randn(B, Hkv, L, E, generator=g))
    keys, values, mask = cache.append(torch.randn(B, Hkv, 1, E, generator=g), torch.randn(B, Hkv, 1, E, generator=g))
    q = torch.randn(B, Hq, 1, E, generator=g)

    def ours(q, k, v):
        return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

    def theirs(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    ours_c, theirs_c = _compiled(ours), _compiled(theirs)
    with torch.no_grad():
        _row(f"decode {L} keys", 0.0, {
            "dotattn eager": lambda: ours(q, keys, values), "dotattn compiled": lambda: ours_c(q, keys, values),
            "torch eager": lambda: theirs(q, keys, values), "torch compiled": lambda: theirs_c(q, keys, values)},
            repeats)


def guards_case(repeats: int) -> None:
    B, Hq, Hkv, E, L = 1, 32, 8, 128, 16
    cache = KVCache(B, Hkv, capacity=L + 1, head_dim=E)
    g = torch.Generator().manual_seed(0)
    cache.append(torch.randn(B, Hkv, L, E, generator=g), torch.randn(B, Hkv, L, E, generator=g))
    keys, values, mask = cache.append(torch.randn(B, Hkv, 1, E, generator=g), torch.randn(B, Hkv, 1, E, generator=g))
    q = torch.randn(B, Hq, 1, E, generator=g)
    spec = mask.spec([])

    def ours(q, k, v):
        return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

    def theirs(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def bare(q, k, v):  # the operator a compiled dotattn step calls, with its arguments written out
        return torch.ops.dotattn.split_k(q, k, v, None, None, E ** -0.5, 0.0, 4, 256, [], spec, True)[0]

    elsewhere = torch.zeros(4 << 20)
    frame = {"q": q, "k": keys, "v": values}
    with torch.no_grad():
        for fn in (ours, theirs, bare):
            torch.compile(fn, fullgraph=True)(q, keys, values)
            manager = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)[0].guard_manager
            warm, cold = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                manager.check(frame)
                warm.append(time.perf_counter() - start)
                elsewhere.add_(1.0)
                start = time.perf_counter()
                manager.check(frame)
                cold.append(time.perf_counter() - start)
            print(f"guards {fn.__name__:7s} {str(manager).count(chr(10)):4d} lines, check warm "
                  f"{1e6 * statistics.median(warm):5.2f} us, cold {1e6 * statistics.median(cold):5.2f} us")


def static_case(capacity: int, filled: int, repeats: int) -> None:
    """A step into a static cache: K and V of its whole capacity and the bool mask (1, 1, 1,
    capacity) of its filled slots, a tensor, given to both libraries (dotattn reads its runs
    inside the operator and visits only the filled keys)."""
    B, Hq, Hkv, E = 1, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, E, generator=g)
    k, v = (torch.randn(B, Hkv, capacity, E, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool)
    mask[..., :filled] = True

    def ours(q, k, v, m):
        return dotattn.scaled_dot_product_attention(q, k, v, m, enable_gqa=True)

    def theirs(q, k, v, m):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, m, enable_gqa=True)

    ours_c, theirs_c = _compiled(ours), _compiled(theirs)
    with torch.no_grad():
        _row(f"static {filled}/{capacity}", 0.0, {
            "dotattn eager": lambda: ours(q, k, v, mask), "dotattn compiled": lambda: ours_c(q, k, v, mask),
            "torch eager": lambda: theirs(q, k, v, mask), "torch compiled": lambda: theirs_c(q, k, v, mask)},
            repeats)


def llama_case(L: int, repeats: int) -> None:
    try:
        import transformers
    except ImportError:
        print("llama step: transformers is not installed (pip install dotattn[hf])")
        return
    import dotattn.hf

    dotattn.hf.register()
    torch.manual_seed(0)
    models = {}
    for impl in ("dotattn", "sdpa"):
        config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                                          max_position_embeddings=L, attn_implementation=impl)
        models[impl] = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 1024, (1, L))
    compiled = {impl: torch.compile(m) for impl, m in models.items()}
    with torch.no_grad():
        _row(f"llama step L {L}", 0.0, {
            "dotattn eager": lambda: models["dotattn"](input_ids=ids, use_cache=False),
            "dotattn compiled": lambda: compiled["dotattn"](input_ids=ids, use_cache=False),
            "torch eager": lambda: models["sdpa"](input_ids=ids, use_cache=False),
            "torch compiled": lambda: compiled["sdpa"](input_ids=ids, use_cache=False)}, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--static", action="store_true", help="only the static cache's step")
    ap.add_argument("--decode", action="store_true", help="only the decoding steps (16 and 2048 keys)")
    ap.add_argument("--guards", action="store_true", help="only the 16-key step's guards")
    args = ap.parse_args()
    L, repeats = (512, 5) if args.quick else (1024, 10)
    torch._inductor.config.fx_graph_cache = False  # compile times from scratch, every run
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios are torch eager / each")
    if args.static:
        static_case(8192, 512, repeats * 20)
        return
    if args.guards:
        guards_case(repeats * 100)
        return
    if not args.decode:
        attention_cases(L, repeats)
    for keys in (16, 2048):
        decode_case(keys, repeats * 20)
    if args.decode:
        return
    static_case(8192, 512, repeats * 20)
    llama_case(L, repeats)


if __name__ == "__main__":
    main()
