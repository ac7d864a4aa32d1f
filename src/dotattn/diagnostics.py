"""Attention diagnostics: what every attention call of a model run did, per layer and head.

    with dotattn.diagnostics.Monitor(model) as monitor:
        model(**inputs)
    print(monitor.table())
    for flag in monitor.flags():
        print(flag)

While a :class:`Monitor` is active, every call of ``dotattn.scaled_dot_product_attention``
(directly, through ``dotattn.nn`` or through ``dotattn.hf``) is measured after its engine
ran. Calls are grouped by the innermost module of ``model`` that made them (its qualified
name, e.g. ``encoder.layer.3.attention.self``), or named ``call 0``, ``call 1``, ... when
no model is given; repeated runs add up under the same name.

What is measured, per query head, over the query rows that see at least one key:

    score mean, std   of the logits s = scale·q·k (soft-capped when asked) + bias at allowed pairs
    entropy           -Σ p log p of each row's softmax, in nats, = lse - Σ p·s
    normalized        entropy / log(allowed keys): 1 is uniform, 0 is one-hot
    max prob          the row's largest probability (saturation)
    first-token mass  the probability on key 0 (attention sinks)
    masked rows       rows with no allowed key (output 0, lse -inf)
    non-finite rows   rows whose output holds NaN or inf

The L×L weights are never materialised: the engine returns the lse alongside the output
(every engine does, at no cost), and the monitor then walks the scores in 256×256 tiles,
skipping those the mask's ``block_map`` says are empty, with p = exp(s - lse) known
exactly per tile, accumulating Σ p·s, the row max and the first column like a backward
pass does. That second pass is one more Q Kᵀ plus a few elementwise passes in torch
ops: a monitored call took 2.2-3.7x the time of a plain tiled call (B1 H8 E64, L 1024
and 4096, ``python -m benchmarks.monitor``) and 36 MiB at L 4096 instead of the 512 MiB
of the weights. Nothing changes when no monitor is active.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dotattn import masks
from dotattn._inputs import Problem
from dotattn._text import table
from dotattn.engines.base import AttentionResult
from dotattn.functional import OBSERVER

__all__ = ["AttentionStats", "Flag", "Monitor", "active"]

BLOCK = 256  # query and key tile of the statistics pass

def active() -> Monitor | None:
    """The monitor recording attention calls in this context, or None."""
    observer = OBSERVER.get()
    return observer if isinstance(observer, Monitor) else None


@dataclass
class AttentionStats:
    """One layer's statistics, per query head, summed over the calls it made.

    Every field but ``name`` and ``calls`` is a (H,) float64 tensor of sums; the
    properties turn them into means. ``rows`` counts query rows that see a key
    (summed over batch and calls); ``pairs`` counts allowed (query, key) pairs.
    """

    name: str
    calls: int
    rows: torch.Tensor
    masked_rows: torch.Tensor
    nonfinite_rows: torch.Tensor
    pairs: torch.Tensor
    score_sum: torch.Tensor
    score_sq_sum: torch.Tensor
    entropy_sum: torch.Tensor
    normalized_entropy_sum: torch.Tensor
    max_prob_sum: torch.Tensor
    first_mass_sum: torch.Tensor

    @property
    def heads(self) -> int:
        return self.rows.numel()

    def merge(self, other: AttentionStats) -> AttentionStats:
        """The sums of two records of the same layer."""
        if other.heads != self.heads:
            raise ValueError(
                f"layer {self.name!r} was called with {self.heads} heads and then {other.heads}; "
                "give each attention layer its own module (Monitor(model)) so their statistics stay apart"
            )
        tensors = {f.name: getattr(self, f.name) + getattr(other, f.name)
                   for f in fields(self) if f.name not in ("name", "calls")}
        return AttentionStats(self.name, self.calls + other.calls, **tensors)

    def _per_row(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.rows.clamp(min=1)

    @property
    def score_mean(self) -> torch.Tensor:
        return self.score_sum / self.pairs.clamp(min=1)

    @property
    def score_std(self) -> torch.Tensor:
        var = self.score_sq_sum / self.pairs.clamp(min=1) - self.score_mean**2
        return var.clamp(min=0).sqrt()

    @property
    def entropy(self) -> torch.Tensor:
        return self._per_row(self.entropy_sum)

    @property
    def normalized_entropy(self) -> torch.Tensor:
        return self._per_row(self.normalized_entropy_sum)

    @property
    def max_prob(self) -> torch.Tensor:
        return self._per_row(self.max_prob_sum)

    @property
    def first_token_mass(self) -> torch.Tensor:
        return self._per_row(self.first_mass_sum)


@dataclass(frozen=True)
class Flag:
    """A head whose statistic crossed a threshold: ``what`` is saturated, near-uniform,
    attention sink, masked rows or non-finite."""

    layer: str
    head: int
    what: str
    value: float
    threshold: float

    def __str__(self) -> str:
        return f"{self.layer} head {self.head}: {self.what} ({self.value:.3g}, threshold {self.threshold:.3g})"


class Monitor:
    """Records statistics of every dotattn attention call made while it is active.

    model: optional ``torch.nn.Module``; calls are then named by the innermost submodule
    running when they happen. Hooks are added on entering and removed on leaving.
    ``layers`` maps each name to its :class:`AttentionStats`, in order of first call.
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.model = model
        self.layers: dict[str, AttentionStats] = {}
        self._calls = 0
        self._running: list[str] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Monitor:
        if self._token is not None:
            raise RuntimeError("this Monitor is already active; create a new one to nest")
        self._token = OBSERVER.set(self)
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._hooks.append(module.register_forward_pre_hook(self._entering(name or "model")))
                self._hooks.append(module.register_forward_hook(self._leaving))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._running.clear()
        OBSERVER.reset(self._token)
        self._token = None

    def _entering(self, name: str):
        def hook(module, args):
            self._running.append(name)
        return hook

    def _leaving(self, module, args, output) -> None:
        self._running.pop()

    def record(self, problem: Problem, result: AttentionResult) -> None:
        """Add one call's statistics; ``result`` must carry the lse."""
        name = self._running[-1] if self._running else f"call {self._calls}"
        self._calls += 1
        stats = measure(problem, result, name)
        self.layers[name] = self.layers[name].merge(stats) if name in self.layers else stats

    def __iter__(self) -> Iterator[AttentionStats]:
        return iter(self.layers.values())

    def flags(self, saturated: float = 0.9, uniform: float = 0.9, sink: float = 0.5) -> list[Flag]:
        """Heads whose mean max prob exceeds ``saturated``, whose normalized entropy exceeds
        ``uniform``, whose first-token mass exceeds ``sink``, or that had masked or
        non-finite rows."""
        found = []
        for s in self:
            tests = [("saturated", s.max_prob, saturated), ("near-uniform", s.normalized_entropy, uniform),
                     ("attention sink", s.first_token_mass, sink),
                     ("masked rows", s.masked_rows, 0), ("non-finite rows", s.nonfinite_rows, 0)]
            for h in range(s.heads):
                found += [Flag(s.name, h, what, float(v[h]), t) for what, v, t in tests if v[h] > t]
        return found

    def table(self) -> str:
        """One line per layer and head."""
        flagged: dict[tuple[str, int], list[str]] = {}
        for f in self.flags():
            flagged.setdefault((f.layer, f.head), []).append(f.what)
        header = ["layer", "head", "score mean", "score std", "entropy", "normalized", "max prob",
                  "first token", "masked rows", "non-finite", "flags"]
        rows = []
        for s in self:
            for h in range(s.heads):
                rows.append([s.name, str(h), f"{s.score_mean[h]:.3f}", f"{s.score_std[h]:.3f}",
                             f"{s.entropy[h]:.3f}", f"{s.normalized_entropy[h]:.3f}", f"{s.max_prob[h]:.3f}",
                             f"{s.first_token_mass[h]:.3f}", str(int(s.masked_rows[h])),
                             str(int(s.nonfinite_rows[h])), ", ".join(flagged.get((s.name, h), []))])
        return table(header, rows)

    def plot(self, path: str | Path, title: str = "attention diagnostics") -> Path:
        """Heatmaps (layers x heads) of normalized entropy, max prob and first-token mass; needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = list(self)
        if not layers:
            raise ValueError("the monitor recorded no attention call; run the model inside `with monitor:`")
        panels = [("normalized entropy (1 = uniform)", "normalized_entropy"),
                  ("mean max probability (saturation)", "max_prob"),
                  ("first-token mass (sinks)", "first_token_mass")]
        H = max(s.heads for s in layers)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 1.2 + 0.45 * len(layers)),
                                 constrained_layout=True)
        for ax, (label, attr) in zip(axes, panels):
            grid = torch.full((len(layers), H), float("nan"))
            for i, s in enumerate(layers):
                grid[i, : s.heads] = getattr(s, attr)
            im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("head")
            ax.set_xticks(range(H))
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([_short(s.name) for s in layers] if ax is axes[0] else [])
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(title)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _short(name: str) -> str:
    """A module path's last two parts that say which layer it is, e.g. 'layer.3'."""
    parts = name.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit() and i > 0]
    return ".".join(parts[numbered[-1] - 1: numbered[-1] + 1]) if numbered else name


def measure(problem: Problem, result: AttentionResult, name: str) -> AttentionStats:
    """Statistics of one call, from its inputs, output and lse, tile by tile (see the module docstring).

    problem.query (*batch, Hq, Lq, E), key (*batch, Hkv, Lk, E); result.lse (*batch, Hq, Lq).
    Per tile, with t = s - lse = log p: Σ s and Σ s² (score mean and std), max t (the row's
    largest probability is exp of it) and Σ p·t (minus the entropy). Empty tiles are skipped,
    full ones need no mask work, partial ones fill masked scores with 0 and masked t with a
    finite value whose exp is 0, so no 0·inf arises.
    """
    q, k, mask = problem.query, problem.key, problem.mask
    *_, Hq, Lq, E = q.shape
    Hkv, Lk = k.shape[-3], k.shape[-2]
    G = Hq // Hkv
    batch = problem.batch_shape
    N = math.prod(batch)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    neg = -0.25 * torch.finfo(dtype).max ** 0.5  # exp() of it is 0, and 0 times it is 0
    with torch.no_grad():
        q = (q.to(dtype) * problem.scale).expand(*batch, Hq, Lq, E).reshape(N, Hkv, G, Lq, E)
        kT = k.to(dtype).expand(*batch, Hkv, Lk, E).reshape(N, Hkv, Lk, E).transpose(-2, -1)
        lse = result.lse.to(dtype).reshape(N, Hkv, G, Lq)
        valid = torch.isfinite(lse)  # rows that see a key and hold no NaN
        shift = torch.where(valid, lse, 0)[..., None]
        # per row (N, Hkv, G, Lq): allowed keys, Σ s, Σ s², max t, Σ p·t, p of key 0
        allowed, s_sum, s_sq = (torch.zeros(N, Hkv, G, Lq, dtype=torch.float64) for _ in range(3))
        t_max = torch.full((N, Hkv, G, Lq), neg, dtype=dtype)
        pt_sum, first = (torch.zeros(N, Hkv, G, Lq, dtype=dtype) for _ in range(2))
        codes = None
        if mask is not None:  # one code per tile: the loosest over batch rows and heads
            codes = mask.block_map(Lq, Lk, BLOCK, BLOCK)
            codes = codes.reshape(-1, *codes.shape[-2:]).amax(0)  # (nQ, nK)
        for qi, q0 in enumerate(range(0, Lq, BLOCK)):
            q1 = min(q0 + BLOCK, Lq)
            rows = q[..., q0:q1, :].reshape(N, Hkv, G * (q1 - q0), E)
            for ki, k0 in enumerate(range(0, Lk, BLOCK)):
                k1 = min(k0 + BLOCK, Lk)
                code = masks.FULL if codes is None else int(codes[qi, ki])
                if code == masks.EMPTY:
                    continue
                s = (rows @ kT[..., k0:k1]).view(N, Hkv, G, q1 - q0, k1 - k0)  # (N, Hkv, G, bq, bk)
                if problem.softcap:  # the logits the softmax saw
                    s = problem.softcap * torch.tanh(s / problem.softcap)
                ok = None
                if code == masks.PARTIAL:
                    t = torch.broadcast_to(mask.tile(Lq, Lk, q0, q1, k0, k1, s.device), (*batch, Hq, q1 - q0, k1 - k0))
                    t = t.reshape(s.shape)
                    if t.dtype != torch.bool:
                        s += t
                        t = t > float("-inf")
                    ok = t
                    s.masked_fill_(~ok, 0)
                row = slice(q0, q1)
                allowed[..., row] += (k1 - k0) if ok is None else ok.sum(-1)
                s_sum[..., row] += s.sum(-1)
                s_sq[..., row] += torch.linalg.vecdot(s, s)
                s -= shift[..., row, :]  # now t = log p
                if ok is not None:
                    s.masked_fill_(~ok, neg)
                t_max[..., row] = torch.maximum(t_max[..., row], s.amax(-1))
                p = s.exp()
                pt_sum[..., row] += torch.linalg.vecdot(p, s)
                if k0 == 0:
                    first[..., row] = p[..., 0]

        entropy = -pt_sum.double()
        normalized = torch.where(allowed > 1, entropy / allowed.clamp(min=2).log(), 0)
        out_finite = torch.isfinite(result.output).all(-1).reshape(valid.shape)

        def per_head(x: torch.Tensor) -> torch.Tensor:  # (N, Hkv, G, Lq), summed over valid rows -> (Hq,)
            return torch.where(valid, x.double(), 0).reshape(N, Hq, Lq).sum((0, 2))

        return AttentionStats(
            name=name, calls=1,
            rows=per_head(torch.ones_like(lse)),
            masked_rows=(lse == float("-inf")).reshape(N, Hq, Lq).sum((0, 2)).double(),
            nonfinite_rows=(~out_finite | torch.isnan(lse)).reshape(N, Hq, Lq).sum((0, 2)).double(),
            pairs=per_head(allowed), score_sum=per_head(s_sum), score_sq_sum=per_head(s_sq),
            entropy_sum=per_head(entropy), normalized_entropy_sum=per_head(normalized),
            max_prob_sum=per_head(t_max.exp()), first_mass_sum=per_head(first),
        )
