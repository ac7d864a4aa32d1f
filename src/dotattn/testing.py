"""The float64 oracle and the test rule every engine is held to.

The rule (after flash-attn's tests): on the same inputs, an engine's error against
the float64 reference engine may be at most twice the error of torch's own
``scaled_dot_product_attention`` in the same dtype, plus a small epsilon
``EPS[dtype] * max(1, max|oracle|)``. It applies to the output and to every gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch

from dotattn._inputs import prepare
from dotattn._layout import kv_per_query_head
from dotattn.engines import AttentionResult
from dotattn.functional import scaled_dot_product_attention

EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# lse has no torch counterpart to compare with, so it gets a relative bound of its own.
LSE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def oracle(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    *args: Any, **kwargs: Any,
) -> AttentionResult:
    """The reference engine in float64, with lse and weights.

    Takes ``scaled_dot_product_attention``'s arguments; tensors are cast to float64
    (autograd still reaches the originals). Returns AttentionResult(output, lse, weights)
    in float64.
    """
    q, k, v = (x.to(torch.float64) for x in (query, key, value))
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(torch.float64)
    kwargs.update(engine="reference", return_lse=True, return_weights=True)
    return scaled_dot_product_attention(q, k, v, attn_mask, *args, **kwargs)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64; NaN if ``actual`` has NaN where ``expected`` does not."""
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    both_nan = actual.isnan() & expected.isnan()
    diff = diff.masked_fill(both_nan, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def _finite_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Like max_error, ignoring entries where ``actual`` is not finite (torch's NaN rows)."""
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    diff = diff[torch.isfinite(diff)]
    return float(diff.max()) if diff.numel() else 0.0


@dataclass(frozen=True)
class Comparison:
    """One quantity of one run: our error and torch's against the oracle, and the bound."""

    quantity: str
    error: float
    torch_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False when error is NaN

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.quantity:>7}: error {self.error:.2e}  torch {self.torch_error:.2e}  "
            f"bound {self.bound:.2e}  {verdict}"
        )


def _leaf(x: torch.Tensor | None, dtype: torch.dtype | None = None, grad: bool = True) -> torch.Tensor | None:
    if x is None:
        return None
    y = x.detach()
    if dtype is not None:
        y = y.to(dtype)
    return y.requires_grad_(grad and x.is_floating_point())


def _softcapped_in_torch_ops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             scale: float | None, softcap: float) -> torch.Tensor:
    """Soft-capped attention in torch ops in the inputs' dtype, softmax in float32, as
    transformers' eager attention computes it (Gemma 2): the baseline where torch's SDPA has
    no soft-capping. q (..., Hq, Lq, E), k (..., Hkv, Lk, E), v (..., Hkv, Lk, Ev)."""
    k, v = kv_per_query_head(k, q.shape[-3]), kv_per_query_head(v, q.shape[-3])
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask if mask.is_floating_point() else s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def compare_to_oracle(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    engine: str,
    backward: bool = True,
    seed: int = 0,
    attention: Callable[..., Any] = scaled_dot_product_attention,
    **kwargs: Any,
) -> list[Comparison]:
    """Run ``engine``, the float64 oracle and torch SDPA on the same inputs; apply the rule.

    ``attention`` is the function under test, called as ``scaled_dot_product_attention`` with
    ``engine=engine, return_lse=True`` (default: dotattn's own; a wrapper of it, or of one of
    dotattn's operators, is held to the same rule).

    Compares output, lse (relative bound) and, with ``backward``, the gradients of query,
    key, value and a float attn_mask under one random upstream gradient.
    Keyword arguments are those of ``scaled_dot_product_attention`` (mask, is_causal,
    scale, enable_gqa, dropout_p with generator, ...). Torch runs with our mask as a
    dense tensor; with dropout it runs without, as a baseline of rounding error only.
    """
    dtype = query.dtype
    # Without backward nothing requires grad, as in inference (where an engine may run a
    # forward-only kernel).
    ours_in = [_leaf(x, grad=backward) for x in (query, key, value, attn_mask)]
    ref_in = [_leaf(x, grad=backward) for x in (query, key, value, attn_mask)]
    torch_in = [_leaf(x, grad=backward) for x in (query, key, value)]

    gen_state = kwargs.get("generator").get_state() if kwargs.get("generator") is not None else None
    ours = attention(*ours_in, engine=engine, return_lse=True, **kwargs)
    if gen_state is not None:
        kwargs["generator"].set_state(gen_state)
    ref = oracle(*ref_in, **kwargs)

    problem = prepare(query, key, value, attn_mask, **{
        k: v for k, v in kwargs.items() if k in ("is_causal", "scale", "enable_gqa", "mask")
    })
    dense = None
    torch_mask_leaf = None
    if problem.mask is not None:
        dense = problem.mask.to_dense(problem.Lq, problem.Lk, device=query.device).detach()
        if dense.is_floating_point():
            dense = torch_mask_leaf = _leaf(dense, dtype, grad=backward)
    if kwargs.get("softcap"):  # torch's SDPA cannot soft-cap: its ops, as eager attention runs them
        expected = _softcapped_in_torch_ops(*torch_in, dense, kwargs.get("scale"), kwargs["softcap"])
    else:
        expected = torch.nn.functional.scaled_dot_product_attention(
            *torch_in, attn_mask=dense, scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False),
        )

    def rule(name: str, got: torch.Tensor, want: torch.Tensor, baseline: torch.Tensor) -> Comparison:
        torch_error = _finite_max_error(baseline, want)
        magnitude = float(want.detach().abs().max()) if want.numel() else 0.0
        bound = 2 * torch_error + EPS[dtype] * max(1.0, magnitude)
        return Comparison(name, max_error(got, want), torch_error, bound)

    results = [rule("output", ours.output, ref.output, expected)]
    lse_ok_pattern = torch.equal(torch.isinf(ours.lse), torch.isinf(ref.lse))
    finite = torch.isfinite(ref.lse)
    lse_error = max_error(ours.lse[finite], ref.lse[finite]) if lse_ok_pattern else float("nan")
    magnitude = float(ref.lse[finite].abs().max()) if finite.any() else 0.0
    results.append(Comparison("lse", lse_error, 0.0, LSE_RTOL[dtype] * max(1.0, magnitude)))

    if backward:
        g = torch.Generator().manual_seed(seed)
        d_out = torch.randn(ref.output.shape, generator=g, dtype=torch.float64).to(query.device)
        ours_grads = torch.autograd.grad(
            ours.output, [x for x in ours_in if x is not None and x.requires_grad], d_out.to(dtype)
        )
        ref_grads = torch.autograd.grad(
            ref.output, [x for x in ref_in if x is not None and x.requires_grad], d_out
        )
        torch_leaves = torch_in + ([torch_mask_leaf] if torch_mask_leaf is not None else [])
        torch_grads = torch.autograd.grad(expected, torch_leaves, d_out.to(dtype), allow_unused=True)
        names = ["dq", "dk", "dv", "dmask"]
        for name, got, want, base in zip(names, ours_grads, ref_grads, torch_grads):
            if base is None:
                base = want
            if name == "dmask":
                base = base.sum_to_size(want.shape)  # torch saw the broadcast, combined mask
            results.append(rule(name, got, want, base))
    return results


def assert_matches_oracle(*args: Any, **kwargs: Any) -> list[Comparison]:
    """compare_to_oracle, raising AssertionError with the full report if any rule breaks."""
    results = compare_to_oracle(*args, **kwargs)
    if not all(r.ok for r in results):
        raise AssertionError("engine breaks the 2x rule:\n" + "\n".join(str(r) for r in results))
    return results
