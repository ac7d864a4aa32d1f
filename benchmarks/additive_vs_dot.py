"""Additive (Bahdanau) attention next to scaled dot-product attention on CPU: the seeds'
comparison table (computation, parameters, speed, memory), measured side by side in one run.

    python -m benchmarks.additive_vs_dot                     # L 128,512,2048; d 64,256; B 1,4; fwd and fwd+bwd
    python -m benchmarks.additive_vs_dot --markdown
    python -m benchmarks.additive_vs_dot --lengths 512 --dims 64,128 --batches 1,2,4 --passes forward --repeats 5
    python -m benchmarks.additive_vs_dot --max-elements 5e9  # also the largest case (L 2048, d 256, B 4)

(from the repository root, as a module)

What is timed, on the same x_q, x_k, x_v (B, L, d) float32, self-attention sizes (Lq = Lk = L), H = d:

  additive  AdditiveAttention(d, d, hidden=d)(x_q, x_k, x_v): W x_q and U x_k once per token,
            the scores vᵀ tanh(W q_i + U k_j + b) a block of query rows at a time, softmax,
            Σ_j weights_ij x_v[j] (the weights are returned as well).
  dot       q = Wq x_q and k = Wk x_k (nn.Linear d -> d, with bias), then
            dotattn.scaled_dot_product_attention(q, k, x_v) with one head of dim d (engine auto).

Neither projects the value, so both compute softmax(score) · x_v and differ only in how the
score is made. "fwd+bwd" adds the backward of sum(output · g) to every input and parameter.

  ms        median of --repeats runs, the two interleaved run by run, after the memory run
            and one warm-up run each, so machine drift hits both alike.
  GFLOP     forward: dot 4·B·L·d² (projections) + 4·B·L²·d (QKᵀ and PV); additive
            4·B·L·d·H (projections) + 4·B·L²·H (add, tanh counted as 1 flop, v·) + 2·B·L²·d (PV);
            softmax not counted. fwd+bwd: 3x the forward (backward = 2x forward) for both.
  peak MiB  the torch profiler (profile_memory=True): bytes torch allocated on the CPU during
            the warm-up call, summed over its allocation and free events in time order, peak
            above what was live before the call (inputs and parameters not counted).
  naive MiB B·L²·H·4: the (B, L, L, H) tanh tensor that an unblocked additive implementation
            builds (and autograd keeps for the backward); AdditiveAttention never builds it.

Cases whose additive work B·L²·H exceeds --max-elements are skipped (listed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

import dotattn
from dotattn.benchmarking import peak_bytes, timed
from dotattn.nn.additive import AdditiveAttention

MiB = 2**20


def cpu_model() -> str:
    """The CPU's model name, as lscpu prints it."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def forward_flops(B: int, L: int, d: int, H: int) -> tuple[float, float]:
    """(additive, dot) forward FLOPs, as the module docstring counts them."""
    additive = 4 * B * L * d * H + 4 * B * L * L * H + 2 * B * L * L * d
    dot = 4 * B * L * d * d + 4 * B * L * L * d
    return additive, dot


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DotProduct(nn.Module):
    """The dot-product side: q = Wq x_q, k = Wk x_k, one head of dim d through dotattn."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.Wq = nn.Linear(d, d)
        self.Wk = nn.Linear(d, d)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.Wq(x_q)[:, None], self.Wk(x_k)[:, None], x_v[:, None]  # (B, 1, L, d): one head
        return dotattn.scaled_dot_product_attention(q, k, v)[:, 0]


def run_case(B: int, L: int, d: int, backward: bool, repeats: int) -> dict:
    """Time and measure both sides on one problem; returns the row's numbers."""
    torch.manual_seed(0)
    additive, dot = AdditiveAttention(d, d, d), DotProduct(d)
    x_q, x_k, x_v = (torch.randn(B, L, d).requires_grad_(backward) for _ in range(3))
    g = torch.randn(B, L, d)
    leaves = [x_q, x_k, x_v, *additive.parameters(), *dot.parameters()]

    def make(module: nn.Module, pick: Callable) -> Callable[[], None]:
        def go() -> None:
            for t in leaves:
                t.grad = None
            if backward:
                pick(module(x_q, x_k, x_v)).backward(g)
            else:
                with torch.no_grad():
                    module(x_q, x_k, x_v)
        return go

    fns = [make(additive, lambda r: r[0]), make(dot, lambda r: r)]
    peaks = [peak_bytes(fn) for fn in fns]
    ms = [t * 1e3 for t in timed(fns, repeats)]
    flops = [f * (3 if backward else 1) for f in forward_flops(B, L, d, d)]
    return {"ms": ms, "gflop": [f / 1e9 for f in flops], "gflops": [f / t / 1e6 for f, t in zip(flops, ms)],
            "mib": [p / MiB for p in peaks], "naive_mib": B * L * L * d * 4 / MiB,
            "engine": dotattn.explain(x_q[:, None], x_k[:, None], x_v[:, None]).engine}


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,512,2048", help="comma-separated L (Lq = Lk)")
    ap.add_argument("--dims", default="64,256", help="comma-separated d (= hidden size H of the additive side)")
    ap.add_argument("--batches", default="1,4", help="comma-separated B")
    ap.add_argument("--passes", default="forward,fwd+bwd", help="forward and/or fwd+bwd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-elements", type=float, default=2**31,
                    help="skip cases whose additive tanh count B·L²·H exceeds this (default 2^31)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = args.passes.split(",")
    for p in passes:
        if p not in ("forward", "fwd+bwd"):
            raise SystemExit(f"--passes: unknown pass {p!r}; use forward, fwd+bwd or both")
    lengths, dims, batches = ([int(x) for x in s.split(",")] for s in (args.lengths, args.dims, args.batches))

    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, {datetime.date.today()}, load average {os.getloadavg()[0]:.2f} at start")

    def table(header: list[str], rows: list[list[str]]) -> None:
        if args.markdown:
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for r in rows:
                print("| " + " | ".join(r) + " |", flush=True)
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            for r in [header, *rows]:
                print("  ".join(c.rjust(w) for c, w in zip(r, widths)), flush=True)

    # Parameters depend on d (and H = d) only.
    print("\nParameters (H = d): additive W, b, U, v = H·(2d + 2); dot-product Wq, bq, Wk, bk = 2·d·(d + 1)")
    rows = []
    for d in dims:
        a, p = n_params(AdditiveAttention(d, d, d)), n_params(DotProduct(d))
        rows.append([str(d), str(d), f"{a:,}", f"{p:,}", f"{a / p:.3f}x"])
    table(["d", "H", "additive params", "dot params", "additive / dot"], rows)

    header = ["L", "d=H", "B", "pass", "additive ms", "dot ms", "time ×", "additive GFLOP", "dot GFLOP",
              "additive GFLOP/s", "dot GFLOP/s", "additive peak MiB", "dot peak MiB", "memory ×", "naive MiB"]
    print(f"\nTime, FLOPs, memory (median of {args.repeats}; × = additive / dot)")
    rows, skipped, results, engines_used = [], [], [], set()
    start = time.perf_counter()
    for pass_name in passes:
        for L in lengths:
            for d in dims:
                for B in batches:
                    if B * L * L * d > args.max_elements:
                        skipped.append(f"L {L} d {d} B {B} {pass_name}")
                        continue
                    r = run_case(B, L, d, pass_name == "fwd+bwd", args.repeats)
                    engines_used.add(r["engine"])
                    results.append((pass_name, L, d, B, r))
                    rows.append([str(L), str(d), str(B), pass_name, *(fmt(x) for x in r["ms"]),
                                 f"{r['ms'][0] / r['ms'][1]:.1f}×", *(fmt(x) for x in r["gflop"]),
                                 *(fmt(x) for x in r["gflops"]), *(fmt(x) for x in r["mib"]),
                                 f"{r['mib'][0] / r['mib'][1]:.2f}×", fmt(r["naive_mib"])])
    table(header, rows)
    print(f"\ndot-product engine: {', '.join(sorted(engines_used))}; "
          f"{time.perf_counter() - start:.0f} s for the cases; load average {os.getloadavg()[0]:.2f} at the end")
    if skipped:
        print(f"skipped (B·L²·H above --max-elements {args.max_elements:.3g}): {'; '.join(skipped)}")
    conclude(results)


def conclude(results: list[tuple[str, int, int, int, dict]]) -> None:
    """A few sentences from the figures just measured."""
    if not results:
        return
    print("\nConclusion:")
    for pass_name in ("forward", "fwd+bwd"):
        rs = [r for p, *_, r in results if p == pass_name]
        if not rs:
            continue
        time_x = [r["ms"][0] / r["ms"][1] for r in rs]
        flop_x = [r["gflop"][0] / r["gflop"][1] for r in rs]
        rate = [r["gflops"] for r in rs]
        L_max = max(L for p, L, *_ in results if p == pass_name)
        at_max = [r["ms"][0] / r["ms"][1] for p, L, *_, r in results if p == pass_name and L == L_max]
        print(f"- {pass_name}: additive takes {min(time_x):.1f}-{max(time_x):.1f}x the time of dot-product "
              f"({min(at_max):.0f}-{max(at_max):.0f}x at L {L_max}) for {min(flop_x):.2f}-{max(flop_x):.2f}x "
              f"the FLOPs: it runs at {min(a for a, _ in rate):.2g}-{max(a for a, _ in rate):.2g} GFLOP/s against "
              f"{min(b for _, b in rate):.3g}-{max(b for _, b in rate):.3g}, since its L²·H work is elementwise "
              "(add, tanh, a dot with v) where QKᵀ is one GEMM.")
        mem_x = [r["mib"][0] / r["mib"][1] for r in rs]
        naive = max(r["naive_mib"] for r in rs)
        print(f"  Peak memory: additive {min(mem_x):.1f}-{max(mem_x):.1f}x dot-product. Blocking keeps the "
              f"(B, L, L, H) tanh tensor (up to {naive:.0f} MiB here) to one 4 MiB block; what remains is "
              "O(B·L²), the scores and the weights it returns, where the tiled engine holds O(B·L·d).")
    dims = sorted({d for _, _, d, _, _ in results})
    counts = [(n_params(AdditiveAttention(d, d, d)), n_params(DotProduct(d))) for d in dims]
    same = all(a == p for a, p in counts)
    print(f"- Parameters at H = d ({', '.join(map(str, dims))}): additive H·(2d + 2), dot-product 2·d·(d + 1): "
          + ("the same count; v (H numbers) stands where dot-product has its second bias, so the seed's "
             "'W, U, v (more)' holds only for H > d." if same else
             ", ".join(f"d {d}: {a / p:.3f}x" for d, (a, p) in zip(dims, counts)) + "."))

if __name__ == "__main__":
    main()
