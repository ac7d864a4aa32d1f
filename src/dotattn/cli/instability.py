"""Attention training instability, caught by a watching Monitor: a small transformer trained on
CPU at a high learning rate, once with plain attention and once with QK-layernorm.

Both runs train the same decoder-only model (2 layers, d_model 64, 4 heads, pre-LN) from the
same seed on the same synthetic data: each sequence is a random block of PERIOD tokens
repeated, so every token after the first block is a copy of the one PERIOD places back,
found by attention. AdamW at lr 0.2 (100 warmup steps):

    unstable  plain attention: the max attention logit grows by orders of magnitude
              (Wortsman et al. 2023, "attention logit growth"), head entropy falls towards 0
              (Zhai et al. 2023, "entropy collapse") and the loss climbs back to chance
    stable    QK-layernorm, LayerNorm on q and k per head before the dot product
              (Dehghani et al. 2023): the logits stay bounded and the loss at the task's floor

A ``diagnostics.Monitor`` with ``watch(entropy_below, logit_growth, window)`` records every
step (each forward of the model is one) and raises its alerts as the steps end; the loss
spike is the first loss above twice the lowest before it, or a non-finite one.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import dotattn
from dotattn.diagnostics import Alert, AttentionInstabilityWarning, Monitor

VOCAB, PERIOD, SEQ, BATCH = 64, 16, 64, 32
D_MODEL, HEADS, LAYERS = 64, 4, 2
# The rules that separate the runs (seeds 0-4): the copy task's attention is rightly one-hot,
# so entropy alone must fall very low; a max logit up by 200 within 10 steps never happens
# with QK-layernorm, where the largest 10-step rise was 13-55.
ENTROPY_BELOW, LOGIT_GROWTH, WINDOW = 0.02, 200.0, 10


class Block(nn.Module):
    """Pre-LN transformer block, attention through dotattn, optionally with QK-layernorm.
    x: (B, L, D) -> (B, L, D)."""

    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))
        self.q_norm = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = dotattn.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class DecoderLM(nn.Module):
    """tokens (B, L) -> logits (B, L, VOCAB)."""

    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        # positions at the token embedding's N(0, 1) scale: the copy PERIOD places back is
        # visible from step 0, so the task is learnt before the logits run away
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(Block(D_MODEL, HEADS, qk_norm) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def make_data(seed: int, steps: int) -> torch.Tensor:
    """(steps, BATCH, SEQ + 1) tokens: per sequence a random block of PERIOD tokens, repeated."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(VOCAB, (steps * BATCH, PERIOD), generator=g)
    return blocks.repeat(1, -(-(SEQ + 1) // PERIOD))[:, : SEQ + 1].view(steps, BATCH, SEQ + 1)


@dataclass
class Run:
    """One training run: per step the loss and, from the Monitor, each layer's head entropies
    and max logits; the watch's alerts; and the wall time."""

    name: str
    loss: torch.Tensor  # (steps,); NaN after a non-finite loss stops the run
    entropy: torch.Tensor  # (steps, LAYERS, HEADS), nats
    max_logit: torch.Tensor  # (steps, LAYERS, HEADS)
    alerts: list[Alert]
    seconds: float

    @property
    def spike(self) -> int | None:
        """The first step whose loss is above twice the lowest loss before it, or not finite."""
        low = float("inf")
        for step, value in enumerate(self.loss.tolist()):
            if not math.isfinite(value) or value > 2 * low:
                return step
            low = min(low, value)
        return None

    @property
    def flag(self) -> Alert | None:
        """The watch's first alert."""
        return min(self.alerts, key=lambda a: a.step, default=None)


def train(qk_norm: bool, seed: int = 0, steps: int = 500, lr: float = 0.2, warmup: int = 100,
          entropy_below: float = ENTROPY_BELOW, logit_growth: float = LOGIT_GROWTH, window: int = WINDOW) -> Run:
    """Train one run (same initial weights and data for a given seed) under a watching Monitor."""
    data = make_data(seed, steps)
    torch.manual_seed(seed)
    model = DecoderLM(qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    loss_log = torch.full((steps,), float("nan"))
    monitor = Monitor(model).watch(entropy_below, logit_growth, window)
    start = time.perf_counter()
    with monitor, warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionInstabilityWarning)  # kept in the run's alerts
        for step in range(steps):
            for group in opt.param_groups:  # linear warmup, then constant
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            x = data[step]
            loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            loss_log[step] = loss.item()
            if not math.isfinite(loss_log[step]):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    entropy = torch.full((steps, LAYERS, HEADS), float("nan"))
    max_logit = torch.full((steps, LAYERS, HEADS), float("nan"))
    for report in monitor.history:
        stats = [report.layers[f"blocks.{i}"] for i in range(LAYERS)]
        entropy[report.step] = torch.stack([s.entropy for s in stats]).float()
        max_logit[report.step] = torch.stack([s.max_logit for s in stats]).float()
    alerts = [a for report in monitor.history for a in report.alerts]
    name = "stable (QK-layernorm)" if qk_norm else "unstable (plain attention)"
    return Run(name, loss_log, entropy, max_logit, alerts, seconds)


def report(run: Run, every: int = 25) -> str:
    """A table every ``every`` steps, then the spike, the first alert and the lead."""
    lines = [f"{run.name}: {run.seconds:.1f} s",
             f"{'step':>5} {'loss':>8} {'min head entropy':>17} {'max logit':>11}"]
    for step in range(0, run.loss.shape[0], every):
        if run.loss[step].isnan():
            break
        lines.append(f"{step:>5} {float(run.loss[step]):>8.3f} {float(run.entropy[step].min()):>17.3g}"
                     f" {float(run.max_logit[step].max()):>11.4g}")
    spike, flag = run.spike, run.flag
    lines.append(f"  loss spike: {'none' if spike is None else f'step {spike} (loss {float(run.loss[spike]):.3f})'}")
    lines.append(f"  first alert: {flag or 'none'}")
    if spike is not None and flag is not None:
        ahead = spike - flag.step
        lines.append(f"  the alert came {ahead} steps before the spike" if ahead > 0 else
                     f"  the alert came {-ahead} steps after the spike")
    return "\n".join(lines)


def plot(runs: list[Run], path: str, title: str, entropy_below: float = ENTROPY_BELOW) -> None:
    """Loss, lowest head entropy and max logit against step for each run (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for run, color in zip(runs, ("tab:red", "tab:blue")):
        steps = torch.arange(run.loss.shape[0])
        axes[0].plot(steps, run.loss, color=color, label=run.name)
        axes[1].plot(steps, run.entropy.flatten(1).amin(1).clamp(min=1e-6), color=color)
        axes[2].plot(steps, run.max_logit.flatten(1).amax(1), color=color)
        for step, style, what in ((run.spike, "-", "loss spike"), (run.flag and run.flag.step, ":", "alert")):
            if step is not None:
                for ax in axes:
                    ax.axvline(step, color=color, linestyle=style, linewidth=1)
                axes[0].annotate(f"{what} {step}", (step, axes[0].get_ylim()[1]), color=color, fontsize=8,
                                 rotation=90, va="top", ha="right")
    axes[1].axhline(entropy_below, color="grey", linestyle="--", linewidth=1, label=f"entropy below {entropy_below:g}")
    axes[1].legend(loc="upper right")
    axes[0].set_ylabel("loss (nats)")
    axes[1].set_ylabel("min head entropy (nats, from 1e-6)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("max attention logit")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title(f"{title}\nsolid line: loss spike, dotted: the Monitor's first alert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
