"""score_mod= and masks.alibi against the alternatives, side by side in one run: causal attention with ALiBi.

    python -m benchmarks.score_mod                 # L 1024 and 2048, B1 H8 E64 float32
    python -m benchmarks.score_mod --lengths 4096

Four ways to run causal + ALiBi (slope_h · (j - i)), forward and forward+backward, all fp32:

    score_mod        dotattn with score_mod=alibi: the tiled engine's torch-ops path, which
                     calls the function per tile (the compiled kernel cannot call Python)
    alibi mask       dotattn with masks.alibi(slopes): the compiled kernel computes the bias
                     per tile from the H slopes
    float mask       dotattn with the bias as an (H, L, L) float mask, read in place by the
                     compiled tiled kernel
    torch SDPA       torch's SDPA with the (H, L, L) bias ANDed with causal as one float mask

and the score_mod engine's error against the float64 oracle next to torch's, plus the peak
memory each call allocates (``dotattn.benchmarking.peak_bytes``: the torch profiler's allocation
events summed in time order). GFLOP/s count
4·B·H·L²·E for the forward, halved for causal, times 3.5 for forward+backward.
"""

from __future__ import annotations

import argparse

import torch

import dotattn
from dotattn import masks
from dotattn.benchmarking import gemm_peak, peak_bytes, timed

B, H, E = 1, 8, 64


def case(L: int, repeats: int, peak: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    i = torch.arange(L)
    bias = slopes[:, None, None] * (i[None, :] - i[:, None])  # (H, L, L)
    causal_bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
    ways = {
        "score_mod": lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, score_mod=alibi),
        "alibi mask": lambda q, k, v: dotattn.scaled_dot_product_attention(
            q, k, v, mask=masks.causal() & masks.alibi(slopes)),
        "float mask": lambda q, k, v: dotattn.scaled_dot_product_attention(q, k, v, bias, is_causal=True),
        "torch SDPA": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, causal_bias),
    }
    flops = 4 * B * H * L * L * E / 2
    oracle = ways["torch SDPA"](q.double(), k.double(), v.double())
    errors = {name: (fn(q, k, v).double() - oracle).abs().max().item() for name, fn in ways.items()}
    with torch.no_grad():
        fwd = dict(zip(ways, timed([lambda fn=fn: fn(q, k, v) for fn in ways.values()], repeats)))
        memory = {name: peak_bytes(lambda fn=fn: fn(q, k, v)) / 2**20 for name, fn in ways.items()}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def train(fn):
        fn(*leaves).sum().backward()

    both = dict(zip(ways, timed([lambda fn=fn: train(fn) for fn in ways.values()], repeats)))
    print(f"L {L}:")
    for name in ways:
        print(f"  {name:>10}: forward {1e3 * fwd[name]:8.1f} ms ({fwd['torch SDPA'] / fwd[name]:4.2f}x torch, "
              f"{flops / fwd[name] / 1e9:5.1f} GFLOP/s, {100 * flops / fwd[name] / 1e9 / peak:3.0f}% of peak)  "
              f"fwd+bwd {1e3 * both[name]:8.1f} ms ({both['torch SDPA'] / both[name]:4.2f}x)  "
              f"peak {memory[name]:7.1f} MiB  max error {errors[name]:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    peak = gemm_peak(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B{B} H{H} E{E} float32, "
          f"torch.matmul peak {peak:.0f} GFLOP/s; causal + ALiBi")
    for L in (int(x) for x in args.lengths.split(",")):
        case(L, args.repeats, peak)


if __name__ == "__main__":
    main()
