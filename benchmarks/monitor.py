"""What a ``dotattn.diagnostics.Monitor`` costs: one attention call with and without it,
side by side in one run, and the peak memory of the monitored call next to the L x L
weights it never builds.

    python -m benchmarks.monitor                   # B1 H8 E64, L 1024 and 4096, full and causal
    python -m benchmarks.monitor --lengths 2048 --engine tiled
"""

from __future__ import annotations

import argparse

import torch

import dotattn
from dotattn import diagnostics
from dotattn.benchmarking import peak_bytes, timed
from benchmarks.cpu import make_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--masks", default="full,causal")
    ap.add_argument("--engine", default="tiled")
    ap.add_argument("--shape", default="1x8x64", help="BxHxE")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    B, H, E = map(int, args.shape.split("x"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine {args.engine}, B{B} H{H} E{E} float32")
    print(f"{'mask':>8} {'L':>6} {'plain ms':>9} {'monitored ms':>13} {'ratio':>6} {'peak MiB':>9} {'L x L weights MiB':>18}")
    for mask_name in args.masks.split(","):
        for L in map(int, args.lengths.split(",")):
            q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
            mask = make_mask(mask_name, L)

            def call() -> torch.Tensor:
                return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine=args.engine)

            def monitored() -> None:
                with diagnostics.Monitor():
                    call()

            plain, watched = timed([call, monitored], args.repeats)
            peak = peak_bytes(monitored)
            print(f"{mask_name:>8} {L:>6} {plain * 1e3:9.1f} {watched * 1e3:13.1f} {watched / plain:6.2f} "
                  f"{peak / 2**20:9.1f} {B * H * L * L * 4 / 2**20:18.0f}", flush=True)


if __name__ == "__main__":
    main()
