"""Peak memory of attention forward+backward, each engine in a fresh subprocess.

    python benchmarks/memory.py                         # causal, L 32768, B1 H4 E64 fp32
    python benchmarks/memory.py --length 8192 --mask window256 --runners torch,tiled,reference

Each runner starts a new Python process that builds q, k, v (and dO), records its
peak RSS (ru_maxrss) after that set-up as the baseline, runs one forward+backward,
and reports the peak RSS again: the difference is what attention itself needed.
Inputs, gradients and the output are the same for every runner.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, dotattn
from benchmarks.cpu import make_mask
args = json.loads(sys.argv[1])
B, H, L, E = args["B"], args["H"], args["L"], args["E"]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, L, E, generator=g).requires_grad_() for _ in range(3))
d_out = torch.randn(B, H, L, E, generator=g)
mask = make_mask(args["mask"], L)
if args["runner"] == "torch" and args["mask"] not in ("full", "causal"):
    dense = mask.to_dense(L, L)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
base = peak()
start = time.perf_counter()
if args["runner"] == "torch":
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=args["mask"] == "causal",
        attn_mask=dense if args["mask"] not in ("full", "causal") else None)
else:
    out = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine=args["runner"])
out.backward(d_out)
print(json.dumps({"base": base, "peak": peak(), "seconds": time.perf_counter() - start}))
"""


def measure(runner: str, **shape) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"runner": runner, **shape})],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mask", default="causal")
    ap.add_argument("--runners", default="torch,tiled")
    args = ap.parse_args()
    shape = dict(B=args.batch, H=args.heads, L=args.length, E=args.head_dim, mask=args.mask)
    print(f"forward+backward, {args.mask}, B{args.batch} H{args.heads} L{args.length} E{args.head_dim} float32")
    results = {r: measure(r, **shape) for r in args.runners.split(",")}
    torch_peak = results.get("torch", {}).get("peak")
    print(f"{'runner':<10} {'peak RSS GiB':>12} {'attention GiB':>13} {'vs torch':>9} {'seconds':>8}")
    for runner, r in results.items():
        if "error" in r:
            print(f"{runner:<10} failed: {r['error']}")
            continue
        ratio = f"{r['peak'] / torch_peak:.2f}x" if torch_peak else "-"
        print(f"{runner:<10} {r['peak']:12.2f} {r['peak'] - r['base']:13.2f} {ratio:>9} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
