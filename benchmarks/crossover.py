"""Where the tiled engine overtakes the reference engine: the rule behind ``engine="auto"``.

    python -m benchmarks.crossover      # from the repository root

Tiny problems with a tensor mask run faster as the reference's few whole-tensor ops than
through the tiled engine's set-up, which classifies such a mask's tiles on every call
(number-only masks are classified once per size and cached).
This times both, forward and forward+backward, over growing B·H·Lq·Lk, side by side
in one run, and prints the ratio; ``TiledEngine.AUTO_MIN_SCORES`` is set from it.
"""

from __future__ import annotations

import torch

import dotattn
from dotattn.benchmarking import timed
from dotattn.engines.tiled import TiledEngine


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, E 64; auto passes tiled "
          f"over below B·H·Lq·Lk = {TiledEngine.AUTO_MIN_SCORES} when the mask holds tensors")
    print(f"{'B':>3} {'H':>3} {'L':>5} {'B·H·L²':>10} {'mask':>8} {'pass':>16} {'reference ms':>13} "
          f"{'tiled ms':>9} {'tiled speedup':>14}")
    for B, H, L in [(1, 1, 8), (1, 1, 32), (1, 2, 64), (1, 4, 64), (1, 8, 64), (1, 2, 128), (1, 4, 128),
                    (1, 8, 128), (1, 8, 256), (4, 8, 256)]:
        dense = torch.rand(L, L) > 0.3
        for mask_name, kwargs in [("none", {}), ("causal", {"is_causal": True}), ("dense", {"attn_mask": dense})]:
            for backward in (False, True):
                q, k, v = (torch.randn(B, H, L, 64, requires_grad=backward) for _ in range(3))

                def run(engine: str):
                    def go() -> None:
                        out = dotattn.scaled_dot_product_attention(q, k, v, engine=engine, **kwargs)
                        if backward:
                            out.sum().backward()
                    return go

                ref, tiled = timed([run("reference"), run("tiled")], repeats=30)
                pas = "forward+backward" if backward else "forward"
                print(f"{B:>3} {H:>3} {L:>5} {B * H * L * L:>10} {mask_name:>8} {pas:>16} {ref * 1e3:13.3f} "
                      f"{tiled * 1e3:9.3f} {ref / tiled:13.2f}x")


if __name__ == "__main__":
    main()
