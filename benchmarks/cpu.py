"""CPU speed of every engine next to torch SDPA, measured side by side in one run.

    python benchmarks/cpu.py                       # fp32 and bf16, L 1024 and 4096
    python benchmarks/cpu.py --lengths 2048 --backward --masks full,causal,window256

For each dtype it first measures the GEMM peak with torch.matmul in that dtype, then
times torch SDPA (default CPU backend; masks other than causal passed as a dense
bool attn_mask) and each engine on the same inputs, interleaved so machine drift
hits both alike. GFLOP/s count 4·B·H·Lq·Lk·E for the forward (x the fraction of
allowed pairs for masked cases) and 2.5x that for the backward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import dotattn
from dotattn import engines, masks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square n x n matmul in ``dtype`` (median of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def make_mask(name: str, L: int) -> masks.Mask | None:
    if name == "full":
        return None
    if name == "causal":
        return masks.causal()
    if name.startswith("window"):
        return masks.causal() & masks.sliding_window(int(name.removeprefix("window")))
    if name == "documents":  # four documents of equal length
        return masks.documents(torch.arange(L) * 4 // L)
    raise ValueError(f"unknown mask {name!r}; use full, causal, windowN or documents")


def timed_pair(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, interleaved run by run."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--masks", default="full,causal")
    ap.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    ap.add_argument("--engines", default="tiled", help="comma-separated engine names")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    B, H, E = args.batch, args.heads, args.head_dim
    names = args.engines.split(",")
    for name in names:
        engines.get(name)  # fails early, listing the known engines
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'forward+backward' if args.backward else 'forward'}, B{B} H{H} E{E}")
    print(f"{'dtype':<9} {'mask':<10} {'L':>6} {'engine':<10} {'ms':>9} {'GFLOP/s':>8} {'%peak':>6} {'vs torch':>9}")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        peak = gemm_peak(dtype)
        print(f"{dtype_name}: GEMM peak {peak:.1f} GFLOP/s")
        for mask_name in args.masks.split(","):
            for L in map(int, args.lengths.split(",")):
                mask = make_mask(mask_name, L)
                dense = None if mask is None else mask.to_dense(L, L)
                allowed = 1.0 if dense is None else float(dense.float().mean())
                flops = 4 * B * H * L * L * E * allowed * (3.5 if args.backward else 1.0)
                q, k, v = (torch.randn(B, H, L, E).to(dtype).requires_grad_(args.backward) for _ in range(3))
                grad = torch.randn(B, H, L, E).to(dtype)

                def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
                    def go() -> None:
                        out = fn()
                        if args.backward:
                            out.backward(grad)
                    return go

                causal_only = mask_name == "causal"
                fns = [run(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if causal_only else dense, is_causal=causal_only))]
                fns += [run(lambda n=n: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine=n))
                        for n in names]
                times = timed_pair(fns, args.repeats)
                for label, seconds in zip(["torch", *names], times):
                    gflops = flops / seconds / 1e9
                    print(f"{dtype_name:<9} {mask_name:<10} {L:>6} {label:<10} {seconds * 1e3:9.1f} "
                          f"{gflops:8.1f} {100 * gflops / peak:5.0f}% {times[0] / seconds:8.2f}x")


if __name__ == "__main__":
    main()
