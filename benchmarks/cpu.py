"""CPU speed of the engines next to torch SDPA, measured side by side in one run.

    python benchmarks/cpu.py                                   # fp32 and bf16, L 1024 and 4096
    python benchmarks/cpu.py --lengths 2048 --backward --masks full,causal,window256,documents
    python benchmarks/cpu.py --lengths 8192 --masks window256 --flex --backward
    python benchmarks/cpu.py --shapes 1x8x64,4x16x128 --lengths 512,2048 --math --markdown
    python benchmarks/cpu.py --lengths 2048 --masks bias --backward  # learned (H, L, L) bias, trained
    python benchmarks/cpu.py --lengths 2048,4096 --masks alibi       # causal & an ALiBi (H, L, L) bias
    python benchmarks/cpu.py --lengths 2048,4096 --masks alibi,alibi_slopes --dtypes float32  # and masks.alibi
    # an encoder's padded batch of short sentences, on both CPU engines:
    python benchmarks/cpu.py --shapes 64x12x32 --lengths 21,65,128 --masks padding --engines split_k,tiled --dtypes float32

For each dtype it first measures the GEMM peak with torch.matmul in that dtype, then
times torch SDPA (default CPU backend; masks other than causal are passed as a dense
bool attn_mask, which is what torch needs for them), optionally torch's math backend
(where the L x L scores fit in --math-gib) and FlexAttention compiled (--flex; forward
only, since it cannot differentiate on CPU; compile time reported apart), and each
engine, interleaved run by run so machine drift hits all alike. GFLOP/s count
4·B·H·Lq·Lk·E for the forward, times the fraction of allowed pairs for masked cases,
and 3.5x that for forward+backward (the backward is 2.5x the forward).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dotattn
from dotattn import engines, masks
# dotattn bench and every other script in benchmarks/ import these from dotattn.benchmarking too
from dotattn.benchmarking import gemm_peak, timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_mask(name: str, L: int) -> masks.Mask | None:
    if name == "full":
        return None
    if name == "causal":
        return masks.causal()
    if name.startswith("window"):
        return masks.causal() & masks.sliding_window(int(name.removeprefix("window")))
    # "bias" (a learned float bias) and "padding" are built in run_case, which knows B and H
    if name == "documents":  # four documents of equal length
        return masks.documents(torch.arange(L) * 4 // L)
    raise ValueError(f"unknown mask {name!r}; use full, causal, windowN, documents, padding, bias, alibi "
                     "or alibi_slopes")


def flex_mask_mod(name: str, L: int):
    """The same mask as a FlexAttention mask_mod."""
    if name == "causal":
        return lambda b, h, i, j: j <= i
    if name.startswith("window"):
        w = int(name.removeprefix("window"))
        return lambda b, h, i, j: (j <= i) & (i - j <= w)
    if name == "documents":
        return lambda b, h, i, j: (i * 4 // L) == (j * 4 // L)
    return lambda b, h, i, j: i >= 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--shapes", default="1x8x64", help="comma-separated BxHxE")
    ap.add_argument("--masks", default="full,causal")
    ap.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    ap.add_argument("--engines", default="tiled", help="comma-separated engine names")
    ap.add_argument("--math", action="store_true", help="also time torch's math backend where it fits")
    ap.add_argument("--math-gib", type=float, default=4.0, help="largest L x L score memory for --math")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention compiled (forward only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print rows as a markdown table")
    args = ap.parse_args()

    names = args.engines.split(",")
    for name in names:
        engines.get(name)  # fails early, listing the known engines
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'forward+backward' if args.backward else 'forward'}")
    sep = " | " if args.markdown else " "
    header = ["dtype", "B", "H", "E", "mask", "L", "engine", "ms", "GFLOP/s", "%peak", "vs torch"]
    print(("| " if args.markdown else "") + sep.join(f"{h:>8}" for h in header) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(header))
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        peak = gemm_peak(dtype)
        print(f"{dtype_name}: GEMM peak {peak:.1f} GFLOP/s (torch.matmul, this run)")
        if dtype != torch.float32:
            # An engine may compute half precisions in float32 where that GEMM is faster,
            # so %peak is against the faster of the two.
            fp32 = gemm_peak(torch.float32)
            print(f"float32 GEMM peak {fp32:.1f} GFLOP/s; %peak below is against {max(peak, fp32):.1f}")
            peak = max(peak, fp32)
        for shape in args.shapes.split(","):
            B, H, E = map(int, shape.split("x"))
            for mask_name in args.masks.split(","):
                for L in map(int, args.lengths.split(",")):
                    run_case(args, names, dtype, dtype_name, peak, B, H, E, mask_name, L, sep)


def run_case(args, names, dtype, dtype_name, peak, B, H, E, mask_name, L, sep) -> None:
    if mask_name == "bias":  # a learned per-head bias (H, L, L), trained along when --backward
        dense = torch.randn(H, L, L).to(dtype).requires_grad_(args.backward)
        mask, allowed = masks.dense(dense), 1.0
    elif mask_name in ("alibi", "alibi_slopes"):  # causal plus ALiBi, slope_h·(j - i)
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
        if mask_name == "alibi":  # as an (H, L, L) float tensor, which the kernel reads in place
            mask = masks.causal() & masks.dense((slopes[:, None, None] * (torch.arange(L) - torch.arange(L)[:, None])).to(dtype))
        else:  # as masks.alibi: the kernel computes it per tile from the slopes
            mask = masks.causal() & masks.alibi(slopes)
        dense = mask.to_dense(L, L).to(dtype)  # what torch needs
        allowed = float((dense > float("-inf")).float().mean())
    elif mask_name == "padding":  # an encoder's padded batch: row b holds L/2 .. L tokens
        lengths = L // 2 + torch.arange(B) * (L - L // 2) // max(B - 1, 1)
        mask = masks.padding(lengths)
        dense = (torch.arange(L) < lengths[:, None])[:, None, None, :].expand(B, 1, L, L)  # what torch needs
        allowed = float(dense.float().mean())
    else:
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
    torch_mask = None if causal_only else dense
    labels = ["torch"]
    fns = [run(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch_mask, is_causal=causal_only))]
    if args.math and B * H * L * L * 4 * (3 if args.backward else 1) <= args.math_gib * 2**30:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def math() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=torch_mask, is_causal=causal_only)
        labels.append("torch-math")
        fns.append(run(math))
    if args.flex and not args.backward:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        start = time.perf_counter()
        block_mask = create_block_mask(flex_mask_mod(mask_name, L), None, None, L, L, device="cpu")
        flex = torch.compile(flex_attention)
        flex(q, k, v, block_mask=block_mask)
        print(f"  FlexAttention compile + first call: {time.perf_counter() - start:.1f} s")
        labels.append("flex")
        fns.append(lambda: flex(q, k, v, block_mask=block_mask))
    labels += names
    fns += [run(lambda n=n: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine=n)) for n in names]
    for n in names:  # how each engine runs it (for tiled: kernel or fallback, and the bf16 GEMM choice)
        print(f"  {n}: {dotattn.explain(q, k, v, mask=mask, engine=n).detail}")
    times = timed(fns, args.repeats)
    for label, seconds in zip(labels, times):
        gflops = flops / seconds / 1e9
        cells = [dtype_name, B, H, E, mask_name, L, label, f"{seconds * 1e3:.3g}", f"{gflops:.1f}",
                 f"{100 * gflops / peak:.0f}%", f"{times[0] / seconds:.2f}x"]
        line = sep.join(f"{c:>8}" for c in cells)
        print(f"| {line} |" if args.markdown else line, flush=True)


if __name__ == "__main__":
    main()
