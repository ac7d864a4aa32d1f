"""``dotattn check``: every CPU engine against the float64 oracle, on this machine.

For each registered engine that runs on CPU and each of float32 and bfloat16 it declares,
on a few fixed-seed problems, it applies the test rule (``dotattn.testing.compare_to_oracle``:
error at most 2x torch's own, plus eps) to the output, the lse and every gradient; checks
that fully masked query rows give exactly 0 output, -inf lse and no NaN gradient; and that
forward+backward run twice gives bitwise-identical results. Exit code 1 if anything fails.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import dotattn
from dotattn import engines, masks
from dotattn._inputs import prepare
from dotattn._text import table
from dotattn.cli.engines import runs_on_cpu
from dotattn.engines.base import dtype_name
from dotattn.testing import compare_to_oracle

CPU_DTYPES = (torch.float32, torch.bfloat16)
SEED = 0


@dataclass(frozen=True)
class Case:
    """One fixed-seed problem: q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, E), and
    ``scaled_dot_product_attention`` keyword arguments (a float ``attn_mask`` among them)."""

    name: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    E: int
    kwargs: Callable[[torch.dtype], dict[str, Any]] = field(default=lambda dtype: {})

    def inputs(self, dtype: torch.dtype) -> tuple[list[torch.Tensor | None], dict[str, Any]]:
        """[q, k, v, attn_mask or None] as leaves that require grad, and the other keyword arguments."""
        g = torch.Generator().manual_seed(SEED)
        shapes = [(self.B, self.Hq, self.Lq, self.E), (self.B, self.Hkv, self.Lk, self.E),
                  (self.B, self.Hkv, self.Lk, self.E)]
        # drawn in float64 and rounded, so every dtype sees the same problem
        tensors: list[torch.Tensor | None] = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
        kwargs = self.kwargs(dtype)
        tensors.append(kwargs.pop("attn_mask", None))
        return [None if t is None else t.detach().requires_grad_() for t in tensors], kwargs


def _bias(dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(SEED + 1)
    return {"attn_mask": torch.randn(4, 97, 130, generator=g, dtype=torch.float64).to(dtype)}  # (Hq, Lq, Lk)


CASES = [
    Case("causal", 2, 4, 4, 97, 130, 64, lambda dtype: {"is_causal": True}),
    Case("gqa_window", 2, 8, 2, 97, 97, 64,
         lambda dtype: {"mask": masks.sliding_window(31), "enable_gqa": True}),
    # batch row 1: keys past 61 padded, query rows past 40 see nothing (fully masked rows)
    Case("padding", 2, 4, 4, 97, 130, 64,
         lambda dtype: {"mask": masks.padding([130, 61], q_lengths=[97, 40])}),
    Case("float_mask", 2, 4, 4, 97, 130, 64, _bias),
]
# --quick: the padding problem (it has fully masked rows too), smaller
QUICK_CASES = [
    Case("padding_small", 2, 2, 2, 65, 97, 32,
         lambda dtype: {"mask": masks.padding([97, 41], q_lengths=[65, 23])}),
]


@dataclass(frozen=True)
class Row:
    engine: str
    dtype: str
    case: str
    tensor: str
    error: str
    torch_error: str
    bound: str
    verdict: str  # "ok", "FAIL", "FAIL: <what>" or "skipped: <why>"

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("check", help="check every CPU engine's numerics against the float64 oracle")
    p.add_argument("--quick", action="store_true", help="one problem per engine and dtype (a few seconds)")
    p.add_argument("--engine", action="append", metavar="NAME",
                   help="check only this engine (repeatable; default every CPU engine)")
    p.set_defaults(run=run)


def _forward_backward(engine: str, case: Case, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[output, lse, gradient of each input] of one forward+backward, and the dense mask (..., Lq, Lk) or None."""
    inputs, kwargs = case.inputs(dtype)
    res = dotattn.scaled_dot_product_attention(*inputs, engine=engine, return_lse=True, **kwargs)
    d_out = torch.randn(res.output.shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    leaves = [x for x in inputs if x is not None]
    grads = torch.autograd.grad(res.output, leaves, d_out.to(dtype))
    problem = prepare(*inputs, **{k: v for k, v in kwargs.items() if k in ("is_causal", "mask", "enable_gqa")})
    dense = None if problem.mask is None else problem.mask.to_dense(problem.Lq, problem.Lk)
    return [res.output, res.lse, *grads], dense


def _fully_masked_rows(engine: str, case: Case, dtype: torch.dtype,
                       run: tuple[list[torch.Tensor], torch.Tensor | None]) -> Row | None:
    """Exactly 0 output and -inf lse on rows with no allowed key, no NaN in any gradient,
    given one forward+backward ``run``; None when the case has no such row."""
    (out, lse, *grads), dense = run
    if dense is None:
        return None
    allowed = dense > float("-inf") if dense.is_floating_point() else dense
    dead = (~allowed.any(-1)).expand(lse.shape)  # (B, Hq, Lq)
    if not dead.any():
        return None
    problems = []
    if not bool((out[dead] == 0).all()):
        problems.append("output not 0")
    if not bool((lse[dead] == float("-inf")).all()):
        problems.append("lse not -inf")
    if any(bool(g.isnan().any()) for g in grads):
        problems.append("NaN in gradients")
    verdict = "FAIL: " + ", ".join(problems) if problems else "ok"
    return Row(engine, dtype_name(dtype), case.name, "masked rows", f"{int(dead.sum())} rows", "-", "-", verdict)


def _determinism(engine: str, case: Case, dtype: torch.dtype,
                 first: tuple[list[torch.Tensor], torch.Tensor | None]) -> Row:
    """Whether a second forward+backward is bitwise identical to ``first``."""
    second, _ = _forward_backward(engine, case, dtype)
    names = ["output", "lse", "dq", "dk", "dv", "dmask"]
    differ = [n for n, a, b in zip(names, first[0], second) if not torch.equal(a, b)]
    return Row(engine, dtype_name(dtype), case.name, "determinism", "-", "-", "-",
               "FAIL: differs in " + ", ".join(differ) if differ else "ok")


def _check(engine: str, dtype: torch.dtype, cases: list[Case]) -> list[Row]:
    rows = []
    ran_any = False
    for case in cases:
        inputs, kwargs = case.inputs(dtype)
        why = dotattn.explain(*inputs, engine=engine, **kwargs)
        if why.engine is None:
            reasons = "; ".join(r for rs in why.rejected.values() for r in rs)
            rows.append(Row(engine, dtype_name(dtype), case.name, "-", "-", "-", "-", f"skipped: {reasons}"))
            continue
        once = _forward_backward(engine, case, dtype)
        if not ran_any:  # determinism on the first problem the engine runs
            rows.append(_determinism(engine, case, dtype, once))
            ran_any = True
        for c in compare_to_oracle(*inputs, engine=engine, seed=SEED, **kwargs):
            rows.append(Row(engine, dtype_name(dtype), case.name, c.quantity, f"{c.error:.2e}",
                            f"{c.torch_error:.2e}", f"{c.bound:.2e}", "ok" if c.ok else "FAIL"))
        masked = _fully_masked_rows(engine, case, dtype, once)
        if masked is not None:
            rows.append(masked)
    return rows


def _print_table(rows: list[Row]) -> None:
    header = ["engine", "dtype", "case", "tensor", "error", "torch error", "bound", "ok"]
    print(table(header, [[r.engine, r.dtype, r.case, r.tensor, r.error, r.torch_error, r.bound, r.verdict]
                         for r in rows]))


def run(args: argparse.Namespace) -> int:
    chosen = [e for e in engines.available() if runs_on_cpu(e)]
    if args.engine:
        known = {e.name for e in chosen}
        unknown = [n for n in args.engine if n not in known]
        if unknown:
            print(f"check: unknown or non-CPU engine {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
            return 2
        chosen = [e for e in chosen if e.name in args.engine]
    cases = QUICK_CASES if args.quick else CASES
    rows = [row for e in chosen for dtype in CPU_DTYPES if dtype in e.support.dtypes
            for row in _check(e.name, dtype, cases)]
    _print_table(rows)
    failed = [r for r in rows if r.failed]
    passed = [r for r in rows if r.verdict == "ok"]
    if failed:
        print("\nfailed: " + "; ".join(f"{r.engine} {r.dtype} {r.case} {r.tensor}" for r in failed))
        print("engines that fail: " + ", ".join(sorted({r.engine for r in failed})))
    print(f"check: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0
