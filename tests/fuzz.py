"""Random problems against the float64 oracle, for as long as you let it run.

    python -m tests.fuzz --seconds 300                      # split_k and tiled
    python -m tests.fuzz --engines triton,split_k_triton,tiled_torch_ops --seed 7
    python -m tests.fuzz --engines tiled --case 1234     # one case again, every comparison

Every engine the test suite knows can be named: importing the tests registers their
test-only engines and runs the Triton ones in Triton's interpreter (slow: hundreds of cases
a minute, where the CPU engines do thousands).

Each case draws its shapes (batch, GQA/MQA, decoding and prefill lengths, awkward head
dims, a transposed query, a KV cache's views), a random mask combination
(``tests.conftest.random_mask``), a dtype and whether to run backward, and checks:
- the 2x rule (``dotattn.testing.compare_to_oracle``) for output, lse and every gradient;
- with some probability, garbage (NaN keys, inf values) wherever no row of a kv head may
  look: output, lse and gradients must stay what they are with clean inputs (up to rounding).

A rule failure is printed with its case. Those where torch's error is exactly 0 on every
failing quantity are counted apart ("torch exact"), not printed: in the runs so far they were
rows with one allowed key, whose exact dq and dk are 0, which torch's softmax backward
returns as 0, while the flash-style backward (delta = rowsum(dO·O)) leaves rounding of about
1e-6 in float32, at the rule's epsilon. The tests avoid such rows; this counts them. The scale stays near 1/sqrt(E): with
scores in the hundreds every engine's error is its own rounding of each score, and two
independent roundings break "2x torch's" in a fraction of cases though neither is worse.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dotattn import engines
from dotattn.testing import compare_to_oracle
from tests.conftest import clean_and_dirty_runs, hidden_keys, random_mask

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def draw(rng: random.Random, engine: str) -> tuple[str, tuple, dict, bool, bool]:
    """One case: its description, (q, k, v), keyword arguments, backward or not, and whether to
    put garbage where no row may look."""
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float64])
    B, Hkv, G = rng.choice([1, 2, 3]), rng.choice([1, 2, 4]), rng.choice([1, 2, 4, 8])
    Lq, Lk = rng.choice([1, 1, 2, 3, 5, 17]), rng.choice([1, 2, 7, 64, 129, 300, 1100])
    E = rng.choice([8, 16, 17, 64, 128])
    Ev = rng.choice([E, E, 16, 24])
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    q = (torch.randn(B, Lq, Hkv * G, E, generator=g).transpose(1, 2) if rng.random() < 0.3
         else torch.randn(B, Hkv * G, Lq, E, generator=g))
    extra = rng.randint(1, 50) if rng.random() < 0.3 else 0  # a cache's views: capacity beyond Lk
    k = torch.randn(B, Hkv, Lk + extra, E, generator=g)[:, :, :Lk]
    v = torch.randn(B, Hkv, Lk + extra, Ev, generator=g)[:, :, :Lk]
    mask = random_mask(rng, B, Lq, Lk) if rng.random() < 0.85 else None
    kwargs = dict(mask=mask, enable_gqa=True)
    if rng.random() < 0.2:
        kwargs["scale"] = rng.choice([0.05, 0.3])
    garbage = mask is not None and rng.random() < 0.4 and hidden_keys(mask, B, Hkv, G, Lq, Lk).any()
    backward = rng.random() < 0.5
    desc = (f"{engine} {str(dtype).removeprefix('torch.')} B{B} Hq{Hkv * G} Hkv{Hkv} Lq{Lq} Lk{Lk} E{E} Ev{Ev} "
            f"mask={mask} scale={kwargs.get('scale')} backward={backward} garbage={bool(garbage)}")
    return desc, tuple(x.to(dtype) for x in (q, k, v)), kwargs, backward, bool(garbage)


def garbage_changes_something(qkv: tuple, kwargs: dict, engine: str, backward: bool) -> str | None:
    """What NaN keys and inf values where no row may look change beyond rounding, or None."""
    tol = TOL[qkv[0].dtype]
    for name, clean, dirty in zip(["output", "lse", "dq", "dk", "dv"],
                                  *clean_and_dirty_runs(*qkv, engine, backward, **kwargs)):
        same = torch.equal(clean.isnan(), dirty.isnan()) and torch.equal(clean.isinf(), dirty.isinf())
        finite = torch.isfinite(clean) & torch.isfinite(dirty)
        if not same or not torch.allclose(dirty[finite].double(), clean[finite].double(), rtol=tol, atol=tol):
            return name
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to draw cases")
    parser.add_argument("--engines", default="split_k,tiled", help="comma-separated engine names")
    parser.add_argument("--seed", type=int, default=0, help="seeds the cases' seeds")
    parser.add_argument("--case", type=int, help="run the one case of this seed (printed with each finding) "
                        "on the first of --engines, and print every comparison")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    names = args.engines.split(",")
    for name in names:
        engines.get(name)  # a bad name fails before the first case
    if args.case is not None:
        desc, qkv, kwargs, backward, _ = draw(random.Random(args.case), names[0])
        print(desc)
        for comparison in compare_to_oracle(*qkv, engine=names[0], backward=backward, **kwargs):
            print(f"    {comparison}")
        return
    counts = {"cases": 0, "skipped": 0, "rule": 0, "torch exact": 0, "garbage": 0, "exceptions": 0}
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        engine, seed = rng.choice(names), rng.randrange(2**31)
        desc, qkv, kwargs, backward, garbage = draw(random.Random(seed), engine)
        desc = f"case {seed}: {desc}"
        counts["cases"] += 1
        try:
            if garbage and (what := garbage_changes_something(qkv, kwargs, engine, backward)):
                counts["garbage"] += 1
                print(f"GARBAGE reaches {what}: {desc}")
            failed = [r for r in compare_to_oracle(*qkv, engine=engine, backward=backward, **kwargs) if not r.ok]
        except engines.EngineNotSupportedError:
            counts["skipped"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - any exception is a finding
            counts["exceptions"] += 1
            print(f"EXCEPTION {error!r}: {desc}")
            continue
        if failed and all(r.torch_error == 0 for r in failed):
            counts["torch exact"] += 1
        elif failed:
            counts["rule"] += 1
            print(f"RULE {desc}\n" + "\n".join(f"    {r}" for r in failed))
    print(", ".join(f"{n} {k}" for k, n in counts.items()))


if __name__ == "__main__":
    main()
