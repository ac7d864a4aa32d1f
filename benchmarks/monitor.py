"""What a ``dotattn.diagnostics.Monitor`` costs, side by side in one run: a plain call, a
monitored one (the tiled kernel computes the statistics while it runs), and a plain call
followed by the tile pass that measures them afterwards (``diagnostics.measure``, what other
engines get); then a decoding step inside a sampling monitor's skipped step against a plain
one, and a monitored decoding step (the split-K kernel's own figures); and the peak memory of the monitored call next to the L x L weights it never builds.

    python -m benchmarks.monitor                   # B1 H8 E64 float32, L 1024 and 4096, full and causal
    python -m benchmarks.monitor --lengths 2048 --masks window256
"""

from __future__ import annotations

import argparse

import torch

import dotattn
from benchmarks.cpu import make_mask
from benchmarks.decode import decoding_step
from dotattn import diagnostics
from dotattn._inputs import prepare
from dotattn.benchmarking import peak_bytes, timed


def calls(B: int, H: int, E: int, lengths: list[int], mask_names: list[str], repeats: int) -> None:
    flops_per = 4 * B * H * E
    print(f"{'mask':>10} {'L':>6} {'plain ms':>9} {'GFLOP/s':>8} | {'fused ms':>9} {'ratio':>6} | "
          f"{'tile pass ms':>12} {'ratio':>6} | {'peak MiB':>9} {'L x L weights MiB':>18}")
    for mask_name in mask_names:
        for L in lengths:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
            mask = make_mask(mask_name, L)

            def plain() -> torch.Tensor:
                return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine="tiled")

            def fused() -> None:
                with diagnostics.Monitor():
                    plain()

            def tile_pass() -> None:
                result = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine="tiled", return_lse=True)
                diagnostics.measure(prepare(q, k, v, mask=mask), result, "call 0")

            t_plain, t_fused, t_pass = timed([plain, fused, tile_pass], repeats)
            peak = peak_bytes(fused)
            print(f"{mask_name:>10} {L:>6} {t_plain * 1e3:9.2f} {flops_per * L * L / t_plain / 1e9:8.1f} | "
                  f"{t_fused * 1e3:9.2f} {t_fused / t_plain:6.2f} | {t_pass * 1e3:12.2f} {t_pass / t_plain:6.2f} | "
                  f"{peak / 2**20:9.1f} {B * H * L * L * 4 / 2**20:18.0f}", flush=True)


def sampled_decoding(keys: int, repeats: int) -> None:
    """A decoding step (B1, 32/8 heads, E 128, a KVCache's mask) alone and in a skipped step of
    Monitor(every=1000): what sampling costs the calls it does not record."""
    q, k, v, mask = decoding_step(1, 32, 8, keys, torch.float32)

    def step() -> torch.Tensor:
        return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

    monitor = diagnostics.Monitor(every=1000)
    monitor.step()  # step 1: not recorded

    def skipped() -> None:
        with monitor:
            for _ in range(100):
                step()

    def alone() -> None:
        for _ in range(100):
            step()

    t_alone, t_skipped = timed([alone, skipped], repeats)
    print(f"decoding step, {keys} keys: alone {t_alone * 1e4:.1f} µs, in a skipped step of Monitor(every=1000) "
          f"{t_skipped * 1e4:.1f} µs ({t_skipped / t_alone:.3f}x)")


def monitored_decoding(keys: int, repeats: int) -> None:
    """A decoding step (as in sampled_decoding) plain, recorded by a Monitor (the split-K kernel
    computes the statistics while it runs), and plain followed by the tile pass."""
    q, k, v, mask = decoding_step(1, 32, 8, keys, torch.float32)

    def plain() -> torch.Tensor:
        return dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True)

    monitor = diagnostics.Monitor()

    def fused() -> None:
        with monitor:
            plain()

    def tile_pass() -> None:
        result = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, return_lse=True)
        diagnostics.measure(prepare(q, k, v, mask=mask, enable_gqa=True), result, "call 0")

    t_plain, t_fused, t_pass = timed([plain, fused, tile_pass], repeats)
    print(f"decoding step, {keys} keys, split_k: plain {t_plain * 1e6:.1f} µs, monitored (in the kernel) "
          f"{t_fused * 1e6:.1f} µs ({t_fused / t_plain:.2f}x), tile pass afterwards {t_pass * 1e6:.1f} µs "
          f"({t_pass / t_plain:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--masks", default="full,causal")
    ap.add_argument("--shape", default="1x8x64", help="BxHxE")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    B, H, E = map(int, args.shape.split("x"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine tiled, B{B} H{H} E{E} float32; "
          "ratios are to the plain call's median")
    calls(B, H, E, [int(x) for x in args.lengths.split(",")], args.masks.split(","), args.repeats)
    for keys in (16, 4096):
        sampled_decoding(keys, 4 * args.repeats)
    for keys in (1024, 4096, 16384):
        monitored_decoding(keys, 20 * args.repeats)


if __name__ == "__main__":
    main()
