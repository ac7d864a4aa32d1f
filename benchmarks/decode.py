"""Decoding against a long KV cache: dotattn (auto, which picks split_k) vs torch SDPA, as
a fraction of this machine's memory bandwidth.

    python -m benchmarks.decode              # cache 4k..128k, B 1 and 8, GQA 32/8 and MQA 32/1, fp32 and bf16
    python -m benchmarks.decode --quick      # a few small cases, seconds
    python -m benchmarks.decode --crossover  # split_k vs tiled over rows per kv head and keys (auto's rule)
    python -m benchmarks.decode --one-core   # the kernel alone on one thread: from cache vs from memory
    python -m benchmarks.decode --overhead   # a 16-key step: the whole call vs the kernel alone vs torch
    python -m benchmarks.decode --static     # a static cache's step: its mask given as a tensor, both libraries

One decoding step: q (B, 32, 1, 128) against the cache's K and V (B, Hkv, L, 128), given to
dotattn as a KVCache gives them (views of its buffers, and its mask: every row is full here,
so that is causal(bottom_right) alone; --overhead also times a left-padded batch's mask)
and to torch as the same tensors without a mask (a step's
single query sees every key, so torch does no less than needed). Decoding reads the whole
cache once per step, so its speed is bytes read (K + V) / time; the reference bandwidth is
a plain ``dst.copy_(src)`` of a buffer 8x the L3 cache, counted as read + write, timed
interleaved with both in every case so that a neighbour's load hits all three alike, and
each counts its fastest run (see ``fastest``). The kernel computes in float32 whatever the
cache's dtype, so the float32 GEMM peak (torch.matmul, measured once per run) caps the FLOPs:
"cap" is the fraction of the copy's bandwidth a case can reach at that peak: below 100%
where each byte of cache feeds many query rows (MQA). It leaves out what widening bfloat16
to float32 costs, which AVX2 does in separate instructions.
Cases whose cache exceeds --max-gib are skipped (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import dotattn
from dotattn import engines, masks
from dotattn.benchmarking import gemm_peak
from dotattn.engines import _tiled_kernel
from dotattn.engines.base import dtype_name
from dotattn.nn import KVCache

E = 128
HEADS = {"gqa": (32, 8), "mqa": (32, 1)}
COPY_BYTES = 256 * 2**20  # per buffer; L3 is 32 MiB here


def fastest(fns: list[Callable[[], object]], repeats: int, budget_s: float = 2.0) -> list[float]:
    """Seconds of each function's fastest run, interleaved run by run after one warm-up each;
    a function stops repeating once its runs (warm-up included) took ``budget_s``, and a
    warm-up that alone took that long counts as its one run.

    The fastest (as ``dotattn.benchmarking.gemm_peak`` takes), not the median: on a shared
    machine a neighbour only ever slows a run, and a step that is a few milliseconds of
    two OpenMP threads loses a whole time slice whenever one of them is preempted."""
    best, spent = [float("inf")] * len(fns), [0.0] * len(fns)
    for round_ in range(repeats + 1):
        for i, fn in enumerate(fns):
            if round_ > 0 and spent[i] >= budget_s and best[i] < float("inf"):
                continue
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            spent[i] += took
            if round_ > 0 or took >= budget_s:
                best[i] = min(best[i], took)
    return best


def decoding_step(B: int, Hq: int, Hkv: int, L: int, dtype: torch.dtype, padded: bool = False,
                  device: torch.device | str = "cpu"):
    """q (B, Hq, 1, E) and what a KVCache of L positions gives the step that fills it: keys and
    values (B, Hkv, L, E), views of its buffers, and its mask (causal(bottom_right), and with
    ``padded`` the padding term too: row 0's prompt is one token short)."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, E, generator=g, device=device).to(dtype)
    cache = KVCache(B, Hkv, capacity=L, head_dim=E, dtype=dtype, device=device)
    for x in (cache.k, cache.v):
        x.copy_(torch.randn(x.shape, generator=g, device=device))
    lengths = torch.full((B,), L - 1)
    lengths[0] -= int(padded)
    cache.append(cache.k[:, :, : L - 1], cache.v[:, :, : L - 1], lengths)  # the prompt, in place
    return q, *cache.append(cache.k[:, :, L - 1:], cache.v[:, :, L - 1:])


def bandwidth_table(lengths: list[int], batches: list[int], heads: list[str], dtypes: list[torch.dtype],
                    repeats: int, max_gib: float) -> None:
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    peak = gemm_peak(torch.float32)  # the kernel computes bfloat16 in float32 too
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy buffer {COPY_BYTES >> 20} MiB; "
          f"E {E}, Lq 1; GB/s = (K + V bytes) / time; %copy = of the copy's GB/s (read + write) in the same case;\n"
          f"%peak = GFLOP/s (4·B·Hq·L·E per step) of the float32 GEMM peak, {peak:.0f} GFLOP/s; "
          f"cap = the most %copy that peak allows at this case's FLOPs per byte of cache (2·Hq/Hkv/itemsize)")
    print(f"{'dtype':>8} {'heads':>5} {'B':>2} {'L':>6} {'K+V MB':>7} {'copy GB/s':>9} {'cap':>4} | {'ours ms':>8} "
          f"{'GB/s':>5} {'%copy':>5} {'%peak':>5} | {'torch ms':>8} {'GB/s':>5} {'%copy':>5} | {'speedup':>7}  engine")
    for dtype in dtypes:
        for name in heads:
            Hq, Hkv = HEADS[name]
            for B in batches:
                for L in lengths:
                    nbytes = 2 * B * Hkv * L * E * torch.tensor([], dtype=dtype).element_size()
                    if nbytes > max_gib * 2**30:
                        print(f"{dtype_name(dtype):>8} {name:>5} {B:>2} {L:>6} {nbytes / 1e6:>7.0f}  skipped: "
                              f"above --max-gib {max_gib}")
                        continue
                    q, k, v, mask = decoding_step(B, Hq, Hkv, L, dtype)
                    engine = dotattn.explain(q, k, v, mask=mask, enable_gqa=True)

                    def ours() -> None:
                        dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

                    def theirs() -> None:
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                    t_copy, t_ours, t_torch = fastest([copy, ours, theirs], repeats)
                    copy_gbs = 2 * COPY_BYTES / t_copy / 1e9
                    ours_gbs, torch_gbs = nbytes / t_ours / 1e9, nbytes / t_torch / 1e9
                    flops = 4 * B * Hq * L * E
                    cap = min(1.0, peak * nbytes / flops / copy_gbs)
                    print(f"{dtype_name(dtype):>8} {name:>5} {B:>2} {L:>6} {nbytes / 1e6:>7.0f} {copy_gbs:>9.1f} "
                          f"{100 * cap:>3.0f}% | {t_ours * 1e3:>8.2f} {ours_gbs:>5.1f} {100 * ours_gbs / copy_gbs:>4.0f}% "
                          f"{100 * flops / t_ours / 1e9 / peak:>4.0f}% | "
                          f"{t_torch * 1e3:>8.2f} {torch_gbs:>5.1f} {100 * torch_gbs / copy_gbs:>4.0f}% | "
                          f"{t_torch / t_ours:>6.2f}x  {engine.engine}", flush=True)


def cold(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median seconds of each function over ``runs`` calls, each right after a copy that evicts
    the caches (code and data), as in a model's decoding step, whose other layers (and the
    cache read itself) evict them between calls; the functions take turns."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, t in zip(fns, times):
            dst.copy_(src)
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def crossover(repeats: int) -> None:
    """split_k vs tiled (both forced) where auto must choose between them, warm (back to back)
    and cold (each call after a cache-evicting copy): decoding steps over rows per kv head and
    cache length, then self-attention of a batch of short sequences (an encoder's, or a
    prefill under no_grad) over length and mask."""
    split_k = engines.get("split_k")
    lengths = (16, 256, 1024, 4096, 16384)
    print(f"float32, E {E}, B 1, Hkv 8; auto picks split_k for rows <= {split_k.auto_max_rows('cpu')} "
          f"(kernel level {_tiled_kernel.LEVEL}); tiled ms / split_k ms "
          f"(> 1: split_k faster), warm (fastest of {repeats}) / cold (median of {4 * repeats})")
    print(f"{'rows':>5} {'G':>3} {'Lq':>3} " + " ".join(f"{'L ' + str(L):>11}" for L in lengths))
    for G, Lq in [(1, 1), (4, 1), (4, 4), (16, 1), (4, 8), (32, 1), (4, 16), (1, 128), (4, 32), (4, 64)]:
        ratios = []
        for L in lengths:
            q, k, v, _ = decoding_step(1, 8 * G, 8, L, torch.float32)
            q = torch.randn(1, 8 * G, Lq, E)
            mask = masks.causal(align="bottom_right")
            ratios.append(_split_k_vs_tiled(q, k, v, mask, repeats))
        print(f"{G * Lq:>5} {G:>3} {Lq:>3} " + " ".join(f"{r:>11}" for r in ratios), flush=True)
    self_lengths = (64, 128, 256, 512)
    for B, H, E_self in ((32, 8, 64), (96, 8, 32)):
        print(f"self-attention, float32, B {B}, H {H}, E {E_self}, rows = L; padding: row b holds L/2 .. L tokens")
        print(f"{'mask':>8} " + " ".join(f"{'L ' + str(L):>11}" for L in self_lengths))
        for name in ("full", "causal", "padding"):
            ratios = []
            for L in self_lengths:
                q, k, v = (torch.randn(B, H, L, E_self) for _ in range(3))
                mask = {"full": None, "causal": masks.causal(),
                        "padding": masks.padding(L // 2 + torch.arange(B) * (L - L // 2) // (B - 1))}[name]
                ratios.append(_split_k_vs_tiled(q, k, v, mask, repeats))
            print(f"{name:>8} " + " ".join(f"{r:>11}" for r in ratios), flush=True)


def _split_k_vs_tiled(q, k, v, mask, repeats: int) -> str:
    """tiled's time over split_k's, warm and cold, both forced: "warm/cold"."""
    fns = [lambda e=e: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine=e)
           for e in ("split_k", "tiled")]
    (w_split, w_tiled), (c_split, c_tiled) = fastest(fns, repeats), cold(fns, 4 * repeats)
    return f"{w_tiled / w_split:.2f}/{c_tiled / c_split:.2f}"


def kernel_args(B: int, Hkv: int, R: int, L: int, dtype: torch.dtype) -> tuple:
    """split_k_attention's arguments for B x Hkv kv heads of R query heads each (one query)
    seeing all L keys, one part."""
    q = torch.randn(B, Hkv * R, 1, E).to(dtype)
    k, v = (torch.randn(B, Hkv, L, E).to(dtype) for _ in range(2))
    return q, k, v, None, None, E**-0.5, 1, 0.0, False  # no soft-capping, no statistics


def one_core(repeats: int) -> None:
    """The split-K kernel alone on one thread, GQA rows (4 per kv head): K+V GB/s when they sit in
    cache (1 kv head, 4096 keys: 4 MiB in fp32, within L3) and when they stream from memory (8 kv
    heads, 64k keys: 512 MiB in fp32). The ratio says how much of the compute hides the memory;
    a plain ``sum`` of 512 MiB on the same thread says what one core can read at all."""
    from dotattn.engines._tiled_kernel import ext as _tiled_cpu

    torch.set_num_threads(1)
    x = torch.ones(2**27)
    (t,) = fastest([x.sum], repeats)
    print(f"one thread, E {E}, 4 rows per kv head; GB/s = K+V bytes / time; "
          f"torch.sum reads 512 MiB at {x.numel() * 4 / t / 1e9:.1f} GB/s")
    del x
    for dtype in (torch.float32, torch.bfloat16):
        for where, Hkv, L in (("cache", 1, 4096), ("memory", 8, 65536)):
            args = kernel_args(1, Hkv, 4, L, dtype)
            calls = max(1, 2**21 // (Hkv * L))  # a few ms per timed run
            (t,) = fastest([lambda: [_tiled_cpu.split_k_attention(*args) for _ in range(calls)]], repeats)
            nbytes = 2 * Hkv * L * E * args[1].element_size()
            print(f"{dtype_name(dtype):>8} {where:>6}: {nbytes * calls / t / 1e9:5.1f} GB/s", flush=True)


def overhead(repeats: int) -> None:
    """Fixed cost per call: a decoding step against 16 keys (GQA 32/8, B 1, a KVCache's mask), where
    the kernel's work is negligible, through dotattn, the kernel alone, and torch SDPA. Warm: calls
    back to back. Cold: see ``cold``."""
    from dotattn.engines._tiled_kernel import ext as _tiled_cpu

    q, k, v, mask = decoding_step(1, 32, 8, 16, torch.float32)
    padded_mask = decoding_step(1, 32, 8, 16, torch.float32, padded=True)[3]
    lo, hi = mask.row_spans(1, 16)
    fns = {
        "dotattn split_k (KVCache mask)": lambda: dotattn.scaled_dot_product_attention(
            q, k, v, mask=mask, enable_gqa=True, engine="split_k"),
        "(left-padded KVCache)": lambda: dotattn.scaled_dot_product_attention(
            q, k, v, mask=padded_mask, enable_gqa=True, engine="split_k"),
        "(no mask)": lambda: dotattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, engine="split_k"),
        "split_k_attention alone": lambda: _tiled_cpu.split_k_attention(q, k, v, lo, hi, E**-0.5, 1, 0.0, False),
        "torch SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    calls = 200
    warm = fastest([lambda fn=fn: [fn() for _ in range(calls)] for fn in fns.values()], repeats)
    medians = cold(list(fns.values()), 10 * repeats)
    print(f"microseconds per call, {torch.get_num_threads()} threads; warm: fastest of {repeats} runs of {calls} "
          f"calls; cold: median of {10 * repeats} calls, each after a {COPY_BYTES >> 20} MiB copy")
    print(f"{'':>30}  {'warm':>7} {'cold':>7}")
    for name, t, c in zip(fns, warm, medians):
        print(f"{name:>30}: {t / calls * 1e6:7.1f} {c * 1e6:7.1f}")


def static_cache(repeats: int) -> None:
    """A decoding step into a static cache (B 1, GQA 32/8, E 128, float32): K and V hold the
    cache's whole capacity, and the step's mask is the bool tensor (1, 1, 1, capacity) that
    transformers builds ahead for one (True on the filled positions). Both libraries get the
    same tensors; dotattn reads the mask as one run of keys and visits only those. "torch,
    filled" is torch given only the filled keys and no mask (what a dynamic cache would hand it),
    the floor for a library that reads no more than it must."""
    g = torch.Generator().manual_seed(0)
    print(f"microseconds per step, {torch.get_num_threads()} threads; fastest of {repeats} runs of 20 steps")
    print(f"{'capacity':>8} {'filled':>6} | {'torch':>8} {'dotattn':>8} | {'speedup':>7} | "
          f"{'torch, filled':>13} {'speedup':>7}  engine")
    for capacity, filled in ((4096, 512), (8192, 512), (8192, 4096), (32768, 2048)):
        q = torch.randn(1, 32, 1, E, generator=g)
        k, v = (torch.randn(1, 8, capacity, E, generator=g) for _ in range(2))
        mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool)
        mask[..., :filled] = True
        ours = lambda: dotattn.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)  # noqa: E731
        theirs = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)  # noqa: E731
        kf, vf = k[:, :, :filled], v[:, :, :filled]
        floor = lambda: torch.nn.functional.scaled_dot_product_attention(q, kf, vf, enable_gqa=True)  # noqa: E731
        t_torch, t_ours, t_floor = fastest([lambda fn=fn: [fn() for _ in range(20)] for fn in (theirs, ours, floor)],
                                           repeats)
        engine = dotattn.explain(q, k, v, mask, enable_gqa=True).engine
        print(f"{capacity:>8} {filled:>6} | {t_torch / 20 * 1e6:8.1f} {t_ours / 20 * 1e6:8.1f} | "
              f"{t_torch / t_ours:6.2f}x | {t_floor / 20 * 1e6:13.1f} {t_floor / t_ours:6.2f}x  {engine}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cache 4k and 16k, B 1, one repeat")
    parser.add_argument("--crossover", action="store_true", help="split_k vs tiled instead of the bandwidth table")
    parser.add_argument("--one-core", action="store_true", help="the kernel alone on one thread, from cache and memory")
    parser.add_argument("--overhead", action="store_true", help="fixed cost per call: dotattn vs the kernel vs torch")
    parser.add_argument("--static", action="store_true", help="a static cache's step, its mask a tensor")
    parser.add_argument("--lengths", type=int, nargs="+", help="cache lengths (default 4096 16384 65536 131072)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), help="head layouts (default gqa mqa)")
    parser.add_argument("--repeats", type=int, help="timed runs per case, the fastest counts (default 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--max-gib", type=float, default=1.0, help="skip cases whose K + V exceed this (GiB)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crossover:
        crossover(repeats)
        return
    if args.one_core:
        one_core(repeats)
        return
    if args.overhead:
        overhead(repeats)
        return
    if args.static:
        static_cache(repeats)
        return
    lengths = args.lengths or ([4096, 16384] if args.quick else [4096, 16384, 65536, 131072])
    batches = args.batches or ([1] if args.quick else [1, 8])
    bandwidth_table(lengths, batches, args.heads or list(HEADS), [torch.float32, torch.bfloat16], repeats, args.max_gib)


if __name__ == "__main__":
    main()
