"""Error against the float64 oracle, next to torch SDPA's error on the same inputs.

    python benchmarks/numerics.py
    python benchmarks/numerics.py --decode-interpreter   # split-K's CUDA kernels, in Triton's interpreter

For every engine that runs on this machine and each dtype it supports, prints the
max abs error of the output and of dq/dk/dv, torch's error, and whether the 2x rule
of dotattn.testing holds. --decode-interpreter instead runs the split-K engine's Triton
kernels (its CUDA path) in Triton's interpreter on CPU tensors, forward only, on the
decoding shape with a left-padded KV cache's mask, in float32, bfloat16 and float16.
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


def main() -> None:
    if "--decode-interpreter" in sys.argv:
        return decode_interpreter()
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
