"""Error against the float64 oracle, next to torch SDPA's error on the same inputs.

    python benchmarks/numerics.py
    python benchmarks/numerics.py --decode-interpreter   # split-K's CUDA kernels, in Triton's interpreter
    python benchmarks/numerics.py --peaked               # dq error relative to torch's, over many problems

For every engine that runs on this machine and each dtype it supports, prints the
max abs error of the output and of dq/dk/dv, torch's error, and whether the 2x rule
of dotattn.testing holds. --decode-interpreter instead runs the split-K engine's Triton
kernels (its CUDA path) in Triton's interpreter on CPU tensors, forward only, on the
decoding shape with a left-padded KV cache's mask, in float32, bfloat16 and float16.
--peaked gives the distribution of each CPU engine's dq error over random problems, as a
ratio to torch's on each, at the default scale and at a larger one that makes the softmax
peaked.
"""

from __future__ import annotations

import os
import sys

if "--decode-interpreter" in sys.argv:  # Triton reads it when it is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dotattn import engines, masks  # noqa: E402
from dotattn.testing import compare_to_oracle  # noqa: E402

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, E)
    (2, 8, 8, 512, 512, 64),
    (1, 8, 2, 256, 1025, 128),
    (2, 32, 8, 1, 4096, 128),  # a decoding step, where auto picks split_k
]
MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window 64": masks.sliding_window(64),
    "padding": masks.padding([300, 200]),
}


def decode_interpreter() -> None:
    from dotattn.engines.split_k import SplitKEngine

    engine = SplitKEngine(kernel="triton")
    engine.name = "split_k_triton"
    engines.register(engine)
    B, Hq, Hkv, Lk, E = 2, 32, 8, 4096, 128
    mask = masks.padding(torch.tensor([3000, Lk]), side="left") & masks.causal(align="bottom_right")
    print(f"split-K Triton kernels in Triton's interpreter; B{B} H{Hq}/{Hkv} L1x{Lk} E{E}, "
          "a left-padded KV cache's mask; max abs error vs the float64 oracle, ours / torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, 1, E, generator=g, dtype=torch.float64).to(dtype)
        k, v = (torch.randn(B, Hkv, Lk, E, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        rows = compare_to_oracle(q, k, v, engine=engine.name, mask=mask, enable_gqa=True, backward=False)
        print(f"{str(dtype)[6:]:<9}" + "".join(
            f"  {r.quantity} {r.error:.1e}/{r.torch_error:.1e}{'' if r.ok else '!'}" for r in rows))


def peaked(problems: int = 60) -> None:
    """float32 dq error of each CPU engine over ``problems`` random problems (B3 H16 Lq3 Lk300
    E128, no mask), each as a ratio to torch's error on the same problem: median, worst, and
    how many break 2x. At scale 0.3 (3.4x the default) the softmax is peaked, and a backward
    that recomputes P = exp(s - lse) from an lse rounded to float32 shows it."""
    names = [e.name for e in engines.available()
             if (e.support.devices is None or "cpu" in e.support.devices) and torch.float32 in e.support.dtypes]
    print(f"float32 dq error / torch's over {problems} problems, B3 H16 L3x300 E128")
    for scale in (None, 0.3):
        ratios: dict[str, list[float]] = {name: [] for name in names}
        for seed in range(problems):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(3, 16, L, E, generator=g) for L, E in ((3, 128), (300, 128), (300, 16)))
            for name in names:
                dq = next(r for r in compare_to_oracle(q, k, v, engine=name, scale=scale, seed=seed) if r.quantity == "dq")
                ratios[name].append(dq.error / dq.torch_error)
        for name, rs in ratios.items():
            rs.sort()
            print(f"scale {'1/sqrt(E)' if scale is None else scale:<9} {name:<10} median {rs[len(rs) // 2]:.2f}x  "
                  f"worst {rs[-1]:.2f}x  above 2x: {sum(r > 2 for r in rs)}")


def main() -> None:
    if "--decode-interpreter" in sys.argv:
        return decode_interpreter()
    if "--peaked" in sys.argv:
        return peaked()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'engine':<10} {'dtype':<9} {'shape':<30} {'mask':<10} " + "".join(
        f"{q:>22}" for q in ("output", "dq", "dk", "dv")
    )
    print(header + "\n" + " " * 62 + "   ours / torch" * 4)
    for engine in engines.available():
        if engine.support.devices is not None and "cpu" not in engine.support.devices:
            continue  # triton, on a machine without a GPU
        for dtype in (torch.float32, torch.bfloat16):
            if dtype not in engine.support.dtypes:
                continue
            for B, Hq, Hkv, Lq, Lk, E in SHAPES:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(B, Hq, Lq, E, generator=g, dtype=torch.float64).to(dtype)
                k = torch.randn(B, Hkv, Lk, E, generator=g, dtype=torch.float64).to(dtype)
                v = torch.randn(B, Hkv, Lk, E, generator=g, dtype=torch.float64).to(dtype)
                for name, mask in MASKS.items():
                    if name == "padding" and B != 2:
                        continue
                    rows = {r.quantity: r for r in compare_to_oracle(
                        q, k, v, engine=engine.name, mask=mask, enable_gqa=Hq != Hkv
                    )}
                    cells = "".join(
                        f"  {rows[n].error:9.2e}/{rows[n].torch_error:9.2e}{'' if rows[n].ok else '!'}"
                        for n in ("output", "dq", "dk", "dv")
                    )
                    shape = f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} E{E}"
                    print(f"{engine.name:<10} {str(dtype)[6:]:<9} {shape:<30} {name:<10}{cells}")
    print("! marks a breach of the rule: error <= 2 x torch error + eps")


if __name__ == "__main__":
    main()
