"""Shared builders for the test suite."""

from __future__ import annotations

import os

# The triton engine's tests run it in Triton's interpreter, on CPU tensors. Triton reads this
# when triton is imported (its language library is made of jit functions) and when a kernel
# is created, so it is set before anything imports triton; the triton_interpreter fixture
# then leaves it set only for the tests of the triton engine.
os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import dotattn  # noqa: E402
from dotattn import engines, masks  # noqa: E402
from dotattn.engines.split_k import SplitKEngine  # noqa: E402
from dotattn.engines.tiled import TiledEngine  # noqa: E402
from dotattn.engines.triton import MISSING as TRITON_MISSING  # noqa: E402

if TRITON_MISSING is None:
    # Triton's language library is made of jit functions, created for the GPU or the
    # interpreter when triton is first imported. Imported here, with TRITON_INTERPRET=1, it is
    # the interpreter's whatever test imports triton first (transformers and FlexAttention do).
    import triton.language  # noqa: E402,F401

# The tiled engine's torch-ops fallback, and its kernel with bfloat16 GEMMs (which this
# machine may not choose, but one with AMX or AVX512-BF16 does), registered under their
# own names for the tests only, so the whole engine-parametrized suite runs on every path.
for _name, _engine in [("tiled_torch_ops", TiledEngine(use_kernel=False)),
                       ("tiled_bf16_gemms", TiledEngine(bf16_gemms=True))]:
    _engine.name = _name
    engines.register(_engine)
# bfloat16 GEMMs change nothing for the other dtypes
engines.get("tiled_bf16_gemms").support = dataclasses.replace(TiledEngine.support, dtypes=(torch.bfloat16,))
# The split-K engine's CUDA path (its Triton kernels), which takes CPU tensors in Triton's
# interpreter; like the triton engine, it runs there only.
INTERPRETED = {"triton"}
if TRITON_MISSING is None:
    _engine = SplitKEngine(kernel="triton")
    _engine.name = "split_k_triton"
    engines.register(_engine)
    INTERPRETED.add(_engine.name)

# A test-only engine written against the engine contract alone; importing it registers it,
# so it runs every engine-parametrized test, the ring tests and `dotattn check`.
import tests.chunked_engine  # noqa: E402,F401

CPU_DTYPES = (torch.float32, torch.bfloat16)


def engine_cases() -> list:
    """(engine, dtype) pairs: every registered engine in every CPU dtype it declares, and the
    triton engine (CUDA-only) in Triton's interpreter when triton is installed."""
    cases = [
        pytest.param(e.name, d, id=f"{e.name}-{str(d).removeprefix('torch.')}")
        for e in engines.available()
        for d in CPU_DTYPES
        if d in e.support.dtypes and (e.support.devices is None or "cpu" in e.support.devices)
        and e.name not in INTERPRETED
    ]
    # float32 only: test_triton.py and test_split_k.py run their 16-bit paths, keeping the interpreter's time down
    cases += [pytest.param(name, torch.float32, id=f"{name}-float32") for name in sorted(INTERPRETED)
              if TRITON_MISSING is None]
    return cases


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    """TRITON_INTERPRET=1 (the triton engines take CPU tensors) in the tests of the engines
    that run in it only: the other tests see them as the CUDA-only engines they are."""
    callspec = getattr(request.node, "callspec", None)
    if request.module.__name__.endswith(("test_triton", "test_triton_ops")) or (
        callspec is not None and INTERPRETED.intersection(map(str, callspec.params.values()))
    ):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def engine_names() -> list[str]:
    """Every registered engine that runs on CPU (here, or in an interpreter)."""
    return sorted({p.values[0] for p in engine_cases()})


def qkv(
    B: int | tuple = 2, Hq: int = 4, Lq: int = 33, E: int = 16, *, Hkv: int | None = None,
    Lk: int | None = None, Ev: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B.., Hq, Lq, E), k (B.., Hkv, Lk, E), v (B.., Hkv, Lk, Ev), drawn in float64."""
    B = B if isinstance(B, tuple) else (B,)
    Hkv = Hq if Hkv is None else Hkv
    Lk = Lq if Lk is None else Lk
    Ev = E if Ev is None else Ev
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*B, Hq, Lq, E, generator=g, dtype=torch.float64)
    k = torch.randn(*B, Hkv, Lk, E, generator=g, dtype=torch.float64)
    v = torch.randn(*B, Hkv, Lk, Ev, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_mask(rng: random.Random, B: int, Lq: int, Lk: int) -> masks.Mask:
    """One to three boolean terms of every kind, ANDed: causal and windows in both alignments,
    padding on either side (with padded queries), documents, prefix-LM, a dense tensor."""
    terms = [
        lambda: masks.causal(align=rng.choice(["top_left", "bottom_right"])),
        lambda: masks.sliding_window(rng.randint(0, 40), rng.randint(0, 4),
                                     align=rng.choice(["top_left", "bottom_right"])),
        lambda: masks.padding([rng.randint(0, Lk) for _ in range(B)],
                              rng.choice([None, [rng.randint(0, Lq) for _ in range(B)]]),
                              side=rng.choice(["left", "right"])),
        lambda: masks.documents(*(torch.arange(L) * rng.randint(1, 3) // L for L in (Lq, Lk))),
        lambda: masks.prefix_lm(rng.randint(0, Lk)),
        lambda: masks.dense(torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(rng.randint(0, 99))) < 0.7),
    ]
    mask = rng.choice(terms)()
    for _ in range(rng.randint(0, 2)):
        mask = mask & rng.choice(terms)()
    return mask


def hidden_keys(mask: masks.Mask, B: int, Hkv: int, G: int, Lq: int, Lk: int) -> torch.Tensor:
    """(B, Hkv, Lk) bool: the keys that no query row of their kv head (G query heads) may see."""
    return ~mask.to_dense(Lq, Lk).expand(B, Hkv * G, Lq, Lk).reshape(B, Hkv, G * Lq, Lk).any(dim=2)


def clean_and_dirty_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, engine: str, backward: bool,
                         **kwargs) -> list[list[torch.Tensor]]:
    """[output, lse, (dq, dk, dv with backward)] of ``engine`` twice: with zeros, then with NaN
    keys and inf values, at the keys no row may see (``hidden_keys`` of kwargs["mask"])."""
    B, Hq, Lq = q.shape[:3]
    Hkv, Lk = k.shape[1:3]
    hidden = hidden_keys(kwargs["mask"], B, Hkv, Hq // Hkv, Lq, Lk)[..., None]
    runs = []
    for bad_k, bad_v in [(0.0, 0.0), (float("nan"), float("inf"))]:
        leaves = [x.detach().clone().requires_grad_(backward)
                  for x in (q, k.masked_fill(hidden, bad_k), v.masked_fill(hidden, bad_v))]
        res = dotattn.scaled_dot_product_attention(*leaves, engine=engine, return_lse=True, **kwargs)
        grads = torch.autograd.grad(res.output.sum(), leaves) if backward else ()
        runs.append([res.output.detach(), res.lse, *grads])
    return runs
