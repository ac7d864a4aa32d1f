"""Attention diagnostics: what the attention calls of a model run did, per layer and head,
cheap enough to leave on in training and serving.

    with dotattn.diagnostics.Monitor(model) as monitor:
        model(**inputs)
    print(monitor.table())
    for flag in monitor.flags():
        print(flag)

While a :class:`Monitor` is active, every call of ``dotattn.scaled_dot_product_attention``
(directly, through ``dotattn.nn`` or through ``dotattn.hf``) in a recorded step is measured
after its engine ran. Calls are grouped by the innermost module of ``model`` that made them
(its qualified name, e.g. ``encoder.layer.3.attention.self``), or named ``call 0``, ``call 1``,
... when no model is given; repeated runs add up under the same name.

What is measured, per query head, over the query rows that see at least one key:

    score mean, std   of the logits s = scale·q·k (soft-capped when asked) + bias at allowed pairs
    max logit         the largest s any row saw (attention logit growth)
    entropy           -Σ p log p of each row's softmax, in nats, = lse - Σ p·s (entropy collapse)
    normalized        entropy / log(allowed keys): 1 is uniform, 0 is one-hot
    max prob          the row's largest probability (saturation)
    first-token mass  the probability on key 0 (attention sinks)
    masked rows       rows with no allowed key (output 0, lse -inf)
    non-finite rows   rows whose output holds NaN or inf

The L×L weights are never materialised. The kernels of the tiled, split_k (C++ and Triton)
and triton engines compute each row's Σ p·s (rescaled with the online softmax's row sum;
split-K's parts merged by their lse), its max logit, Σ s, Σ s², allowed keys and the logit of
key 0 while they run, so the statistics cost one more multiply-add per score, and write them
in the form a call's statistics are two reductions of (:func:`measure_fused`). Other engines
(the reference, the tiled engine's torch-ops path) hand back the lse (every engine has it),
and the monitor then walks the scores in 256×256 tiles (:func:`measure`), skipping those
the mask's ``block_map`` says are empty, with p = exp(s - lse) known exactly per tile; that
pass is the oracle the kernels' figures are tested against. ``python -m benchmarks.monitor``
gives the cost of both.

Sampling (``every=``, ``sample=``) records some steps and skips the rest: a skipped call pays
one attribute read. As each recorded step ends, exporters receive a :class:`StepReport`
(``to_logging``, ``to_tensorboard``, ``add_exporter``), and :meth:`Monitor.watch` raises
:class:`Alert` s for heads whose entropy collapses or whose max logit grows fast.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dotattn import _score_mod, masks
from dotattn._inputs import ROW_STATS, Problem
from dotattn._text import table
from dotattn.engines.base import AttentionResult
from dotattn.functional import OBSERVER

__all__ = ["Alert", "AttentionInstabilityWarning", "AttentionStats", "Flag", "Monitor", "StepReport", "Watch",
           "active", "read_tensorboard"]

BLOCK = 256  # query and key tile of the statistics pass

def active() -> Monitor | None:
    """The monitor recording attention calls in this context, or None."""
    observer = OBSERVER.get()
    return observer if isinstance(observer, Monitor) else None


# The sums an AttentionStats keeps per head, in the column order of AttentionStats.sums and of
# the rows the kernels write (csrc/common.h), which are these ten and the max logit.
SUMS = ("rows", "masked_rows", "nonfinite_rows", "pairs", "score_sum", "score_sq_sum", "entropy_sum",
        "normalized_entropy_sum", "max_prob_sum", "first_mass_sum")


assert len(SUMS) + 1 == ROW_STATS  # the kernels' row layout: these sums, then the max logit


def _column(i: int) -> property:
    return property(lambda self: self.sums[:, i], doc=f"(H,) float64: the sum of {SUMS[i]}")


@dataclass
class AttentionStats:
    """One layer's statistics, per query head, summed over the calls it made.

    ``sums`` (H, 10) float64 holds, per head, the sums named in ``SUMS``, each also an (H,)
    attribute: ``rows`` counts query rows that see a key (summed over batch and calls),
    ``masked_rows`` those that see none, ``nonfinite_rows`` those whose output or lse is NaN or
    inf, ``pairs`` allowed (query, key) pairs, then the sums of scores, squared scores, row
    entropy, normalized entropy, max probability and first-token mass. ``max_logit`` (H,) is
    the largest logit any row saw (-inf for none). The properties below turn sums into means.
    """

    name: str
    calls: int
    sums: torch.Tensor
    max_logit: torch.Tensor

    @property
    def heads(self) -> int:
        return self.sums.shape[0]

    def merge(self, other: AttentionStats) -> AttentionStats:
        """The sums of two records of the same layer."""
        if other.heads != self.heads:
            raise ValueError(
                f"layer {self.name!r} was called with {self.heads} heads and then {other.heads}; "
                "give each attention layer its own module (Monitor(model)) so their statistics stay apart"
            )
        return AttentionStats(self.name, self.calls + other.calls, self.sums + other.sums,
                              torch.maximum(self.max_logit, other.max_logit))

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


for _i, _name in enumerate(SUMS):
    setattr(AttentionStats, _name, _column(_i))


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


@dataclass(frozen=True)
class Alert:
    """An early warning from :meth:`Monitor.watch`: at ``step``, head ``head`` of ``layer``
    had ``what`` ("entropy collapse" or "logit growth") at ``value``, past ``threshold``."""

    step: int
    layer: str
    head: int | None  # None: some head of the layer (figures read from a log hold the layer's extreme)
    what: str
    value: float
    threshold: float

    def __str__(self) -> str:
        head = "a head" if self.head is None else f"head {self.head}"
        return (f"step {self.step}: {self.layer} {head}: {self.what} "
                f"({self.value:.3g}, threshold {self.threshold:.3g})")


class Watch:
    """The early-warning rules, fed one step at a time per layer (a Monitor's, or the series
    ``read_tensorboard`` returns):

    entropy collapse  a head's mean row entropy (nats) below ``entropy_below`` (Zhai et al.
                      2023: it falls towards 0 before the loss diverges)
    logit growth      a head's max logit more than ``logit_growth`` above its lowest value
                      in the last ``window`` steps (Dehghani et al. 2023, Wortsman et al.
                      2023: the reason for QK-layernorm)

    Each (layer, head, kind) alerts once."""

    def __init__(self, entropy_below: float | None = None, logit_growth: float | None = None, window: int = 10):
        if entropy_below is None and logit_growth is None:
            raise ValueError("watch needs entropy_below=, logit_growth= or both")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int (steps), got {window!r}")
        self.entropy_below, self.logit_growth, self.window = entropy_below, logit_growth, window
        self._seen: dict[str, list[tuple[int, torch.Tensor]]] = {}  # layer -> the window's (step, max logit)
        self._raised: set[tuple[str, int | None, str]] = set()

    def check(self, step: int, layer: str, entropy: torch.Tensor, max_logit: torch.Tensor,
              heads: list[int | None] | None = None) -> list[Alert]:
        """The new alerts at ``step`` for ``layer``, given per head its entropy (NaN for a head
        that saw no row) and max logit, (H,) each; ``heads`` names them (default 0..H-1)."""
        seen = self._seen.setdefault(layer, [])
        seen.append((step, max_logit))
        while seen[0][0] <= step - self.window:
            seen.pop(0)
        low = torch.stack([m for _, m in seen]).amin(0)
        alerts = []
        for h, name in enumerate(heads or range(len(entropy))):
            tests = []
            if self.entropy_below is not None:
                e = float(entropy[h])
                tests.append(("entropy collapse", e, self.entropy_below, e < self.entropy_below))  # NaN: False
            if self.logit_growth is not None:
                rise = float(max_logit[h] - low[h]) if torch.isfinite(low[h]) else 0.0
                tests.append(("logit growth", rise, self.logit_growth, rise > self.logit_growth))
            for what, value, threshold, hit in tests:
                if hit and (layer, name, what) not in self._raised:
                    self._raised.add((layer, name, what))
                    alerts.append(Alert(step, layer, name, what, value, threshold))
        return alerts


class AttentionInstabilityWarning(UserWarning):
    """Issued (``warnings.warn``) for each :class:`Alert` of a watched monitor."""


@dataclass(frozen=True)
class StepReport:
    """What one recorded step hands to the exporters: its number, each layer's statistics over
    that step's calls (in order of first call), and the watch's alerts."""

    step: int
    layers: dict[str, AttentionStats]
    alerts: list[Alert]


class Monitor:
    """Records statistics of dotattn attention calls made while it is active.

    model:  optional ``torch.nn.Module``; calls are then named by the innermost submodule
            running when they happen, and each forward of ``model`` is one step. Hooks are
            added on entering and removed on leaving.
    every:  record one step in ``every`` (steps 0, every, 2·every, ...)
    sample: or record each step with this probability (seeded by ``seed``)
    steps:  "forward" (each forward of ``model`` ends a step; the default with a model) or
            "manual" (the caller ends each with :meth:`step`; the default without one)

    A step that is not recorded costs its calls one attribute read each. ``layers`` maps
    each name to its :class:`AttentionStats` over every recorded step, in order of first call.
    Exporters (:meth:`add_exporter`, :meth:`to_logging`, :meth:`to_tensorboard`) get a
    :class:`StepReport` as each recorded step ends; :meth:`watch` adds early warnings.
    """

    def __init__(self, model: torch.nn.Module | None = None, *, every: int = 1, sample: float | None = None,
                 seed: int = 0, steps: str | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if sample is not None and not 0.0 < sample <= 1.0:
            raise ValueError(f"sample must be a probability in (0, 1], got {sample!r}")
        steps = steps or ("forward" if model is not None else "manual")
        if steps not in ("forward", "manual") or (steps == "forward" and model is None):
            raise ValueError(f"steps must be 'manual', or 'forward' with a model; got {steps!r}")
        self.model, self.every, self.sample, self.steps = model, every, sample, steps
        self._random = random.Random(seed)
        self.layers: dict[str, AttentionStats] = {}
        self.history: list[StepReport] = []  # the recorded steps, as exported
        self.step_index = 0
        self.recording = self._records(0)  # whether this step's calls are recorded (read by every call)
        self._step_layers: dict[str, AttentionStats] = {}
        self._exporters: list[Callable[[StepReport], None]] = []
        self._watch: Watch | None = None
        self._calls = 0
        self._running: list[str] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._token: contextvars.Token | None = None

    def _records(self, step: int) -> bool:
        if self.sample is not None:
            return self._random.random() < self.sample
        return step % self.every == 0

    def __enter__(self) -> Monitor:
        if self._token is not None:
            raise RuntimeError("this Monitor is already active; create a new one to nest")
        self._token = OBSERVER.set(self)
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._hooks.append(module.register_forward_pre_hook(self._entering(name or "model")))
                self._hooks.append(module.register_forward_hook(self._leaving))
            if self.steps == "forward":
                self._hooks.append(self.model.register_forward_hook(self._forward_done))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._running.clear()
        OBSERVER.reset(self._token)
        self._token = None
        self._end_step()

    def _entering(self, name: str):
        def hook(module, args):
            self._running.append(name)
        return hook

    def _leaving(self, module, args, output) -> None:
        self._running.pop()

    def _forward_done(self, module, args, output) -> None:  # a hook that returned something would replace the output
        self.step()

    def record(self, problem: Problem, result: AttentionResult) -> None:
        """Add one call's statistics; ``result`` must carry the lse. Uses the figures the engine
        computed while it ran when it left them (``problem.derived["row_stats"]``), else the
        tile pass of :func:`measure`."""
        name = self._running[-1] if self._running else f"call {self._calls}"
        self._calls += 1
        row_stats = problem.derived.get("row_stats")
        stats = measure(problem, result, name) if row_stats is None else measure_fused(problem, result, row_stats, name)
        for layers in (self.layers, self._step_layers):
            layers[name] = layers[name].merge(stats) if name in layers else stats

    def step(self, index: int | None = None) -> StepReport | None:
        """End the current step (exporting it and checking the watch, when it was recorded) and
        begin the next, numbered ``index`` (default: one more). Returns the ended step's report,
        or None when it recorded nothing."""
        report = self._end_step()
        self.step_index = self.step_index + 1 if index is None else index
        self.recording = self._records(self.step_index)
        return report

    def _end_step(self) -> StepReport | None:
        self._calls = 0  # unnamed calls are numbered within their step, so call i is one layer throughout
        if not self._step_layers:
            return None
        layers, self._step_layers = self._step_layers, {}
        report = StepReport(self.step_index, layers, self._check(self.step_index, layers))
        self.history.append(report)
        for alert in report.alerts:
            warnings.warn(AttentionInstabilityWarning(str(alert)), stacklevel=3)
        for export in self._exporters:
            export(report)
        return report

    def add_exporter(self, export: Callable[[StepReport], None]) -> Monitor:
        """Call ``export(report)`` as each recorded step ends (a metrics client, a W&B run, ...)."""
        self._exporters.append(export)
        return self

    def to_logging(self, logger: logging.Logger | str | None = None, level: int = logging.INFO) -> Monitor:
        """Log one line per layer of each recorded step (lowest head entropy, highest logit), and
        each alert as a warning, to ``logger`` (a Logger or a name; default "dotattn")."""
        log = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger or "dotattn")

        def export(report: StepReport) -> None:
            for s in report.layers.values():
                low = int(s.entropy.argmin()) if s.heads else 0
                log.log(level, "attention step %d %s: entropy min %.4g (head %d) mean %.4g, max logit %.4g, "
                        "max prob %.4g", report.step, s.name, float(s.entropy[low]), low, float(s.entropy.mean()),
                        float(s.max_logit.max()), float(s.max_prob.mean()))
            for alert in report.alerts:
                log.warning("attention %s", alert)
        return self.add_exporter(export)

    def to_tensorboard(self, writer, prefix: str = "attention") -> Monitor:
        """Write each recorded step to a ``torch.utils.tensorboard.SummaryWriter`` (pip install
        dotattn[monitor]): per layer the scalars ``{prefix}/{layer}/entropy_min``,
        ``entropy_mean``, ``max_logit``, ``max_prob``, and layers x heads heatmap images
        ``{prefix}/entropy`` (normalized entropy, 1 = uniform) and ``{prefix}/max_logit``
        (scaled to the step's largest), brighter = higher."""
        def export(report: StepReport) -> None:
            layers = list(report.layers.values())
            for s in layers:
                tag = f"{prefix}/{s.name}"
                writer.add_scalar(f"{tag}/entropy_min", float(s.entropy.min()), report.step)
                writer.add_scalar(f"{tag}/entropy_mean", float(s.entropy.mean()), report.step)
                writer.add_scalar(f"{tag}/max_logit", float(s.max_logit.max()), report.step)
                writer.add_scalar(f"{tag}/max_prob", float(s.max_prob.mean()), report.step)
            H = max(s.heads for s in layers)
            for name, grid in (("entropy", _grid(layers, H, lambda s: s.normalized_entropy)),
                               ("max_logit", _grid(layers, H, lambda s: s.max_logit))):
                top = grid.nan_to_num(nan=0.0, neginf=0.0).abs().amax().clamp(min=1e-12)
                image = (grid / top if name == "max_logit" else grid).nan_to_num(0.0).clamp(0, 1)
                writer.add_image(f"{prefix}/{name}", image[None], report.step, dataformats="CHW")
            for alert in report.alerts:
                writer.add_text(f"{prefix}/alerts", str(alert), report.step)
        return self.add_exporter(export)

    def watch(self, entropy_below: float | None = None, logit_growth: float | None = None,
              window: int = 10) -> Monitor:
        """Early warning of training instability, checked as each recorded step ends (see
        :class:`Watch`): an :class:`Alert` (a warning, a log line, and in ``StepReport.alerts``)
        for a head whose mean entropy falls below ``entropy_below`` or whose max logit rose by
        more than ``logit_growth`` within the last ``window`` steps."""
        self._watch = Watch(entropy_below, logit_growth, window)
        return self

    def _check(self, step: int, layers: dict[str, AttentionStats]) -> list[Alert]:
        if self._watch is None:
            return []
        return [a for s in layers.values()
                for a in self._watch.check(step, s.name, s.entropy.masked_fill(s.rows == 0, float("nan")), s.max_logit)]

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
            grid = _grid(layers, H, lambda s: getattr(s, attr))
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


def _grid(layers: list[AttentionStats], H: int, value: Callable[[AttentionStats], torch.Tensor]) -> torch.Tensor:
    """(layers, H) of one per-head figure, NaN where a layer has fewer heads."""
    grid = torch.full((len(layers), H), float("nan"))
    for i, s in enumerate(layers):
        grid[i, : s.heads] = value(s).float()
    return grid


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
        if mask is not None:  # one code per tile over batch rows and heads: PARTIAL where they differ
            codes = mask.block_map(Lq, Lk, BLOCK, BLOCK)
            codes = codes.reshape(-1, *codes.shape[-2:])
            lo, hi = codes.amin(0), codes.amax(0)  # (nQ, nK)
            codes = torch.where(lo == hi, hi, masks.PARTIAL)
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
                if problem.score_mod is not None:
                    s = _score_mod.apply_tile(problem.score_mod, s, slice(0, N), Hkv, q0, k0)
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

        # per row, in the kernels' layout (csrc/common.h): sees a key, sees none, 0, allowed keys,
        # Σ s, Σ s², entropy, normalized entropy, max prob, first-token mass, max logit
        entropy = -pt_sum.double()
        normalized = torch.where(allowed > 1, entropy / allowed.clamp(min=2).log(), 0)
        top = torch.where(valid, t_max + shift[..., 0], float("-inf")).double()
        none = torch.zeros_like(allowed)
        rows = torch.stack([valid.double(), (lse == float("-inf")).double(), none, allowed, s_sum, s_sq, entropy,
                            normalized, t_max.double().exp(), first.double(), top], -1)
        return _per_head(name, result, lse.reshape(N, Hq, Lq), rows.reshape(N, Hq, Lq, len(SUMS) + 1))


def measure_fused(problem: Problem, result: AttentionResult, row_stats: torch.Tensor, name: str) -> AttentionStats:
    """Statistics of one call from the per-row figures its engine computed while it ran
    (``problem.derived["row_stats"]``, (N, Hq, Lq, 11), the layout of csrc/common.h), so with no
    second pass over the scores and, when no row is NaN or inf, two reductions."""
    N, Hq, Lq = row_stats.shape[:3]
    with torch.no_grad():
        return _per_head(name, result, result.lse.reshape(N, Hq, Lq), row_stats)


# What a row that does not count adds: nothing to the sums, -inf to the max logit.
_NOTHING = (0.0,) * len(SUMS) + (float("-inf"),)


def _per_head(name: str, result: AttentionResult, lse: torch.Tensor, rows: torch.Tensor) -> AttentionStats:
    """One call's AttentionStats from its per-row figures ``rows`` (N, Hq, Lq, 11) in the kernels'
    layout, summed (the max logit maximised) over the rows that see a key and hold no NaN."""
    N, Hq, Lq = lse.shape
    # One check for the common case: the output's sum is finite when all its entries are, and the
    # lse's sum is -inf or finite when no entry is NaN or +inf (bar an overflow, which only costs
    # the exact pass below).
    out_sum, lse_sum = torch.stack([result.output.sum().to(lse.dtype), lse.sum()]).tolist()
    if not (math.isfinite(out_sum) and lse_sum < math.inf):  # some row NaN or inf: left out, and counted
        valid, masked = torch.isfinite(lse), lse == float("-inf")
        nonfinite = ~torch.isfinite(result.output).all(-1).reshape(N, Hq, Lq) | torch.isnan(lse)
        rows = torch.where(valid[..., None], rows, rows.new_tensor(_NOTHING))
        rows = torch.cat([rows[..., :1], masked[..., None].to(rows.dtype), nonfinite[..., None].to(rows.dtype),
                          rows[..., 3:]], -1)
    sums = rows[..., :len(SUMS)].sum((0, 2), dtype=torch.float64)  # (Hq, 10)
    top = (rows[..., len(SUMS)].amax((0, 2)).double() if N * Lq else
           torch.full((Hq,), float("-inf"), dtype=torch.float64))
    return AttentionStats(name=name, calls=1, sums=sums, max_logit=top)


def read_tensorboard(path: str | Path, prefix: str = "attention") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What ``Monitor.to_tensorboard`` wrote to the event files under ``path``: layer -> figure
    (entropy_min, entropy_mean, max_logit, max_prob) -> [(step, value)] in step order. Needs
    tensorboard (pip install dotattn[monitor])."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(path))
    runs.Reload()
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, tags in runs.Runs().items():
        for tag in tags.get("scalars", []):
            if not tag.startswith(prefix + "/") or tag.count("/") < 2:
                continue
            layer, figure = tag[len(prefix) + 1:].rsplit("/", 1)
            points = series.setdefault(layer, {}).setdefault(figure, [])
            points += [(e.step, e.value) for e in runs.Scalars(run, tag)]
    for figures in series.values():
        for points in figures.values():
            points.sort()
    return series
