"""``dotattn demo``: the seed's four steps on one sentence, each printed with its shape."""

from __future__ import annotations

import argparse

import torch

import dotattn

SENTENCE = "Bill is going to the theatre to watch a new movie"


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="walk through the four steps of attention on a sentence")
    p.add_argument("sentence", nargs="?", default=SENTENCE)
    p.add_argument("--d-model", type=int, default=64, help="embedding size (default 64)")
    p.add_argument("--d-k", type=int, default=16, help="query/key size (default 16)")
    p.add_argument("--d-v", type=int, default=24, help="value size, may differ from d_k (default 24)")
    p.add_argument("--causal", action="store_true", help="let each word see only itself and earlier words")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _show(title: str, x: torch.Tensor) -> None:
    print(f"\n{title}  shape {tuple(x.shape)}")


def _print_matrix(A: torch.Tensor, words: list[str]) -> None:
    """A (T x T) as a table: rows are the attending words, columns the attended ones."""
    width = max(len(w) for w in words)
    print(" " * (width + 3) + " ".join(f"{w[:5]:>5}" for w in words))
    for word, row in zip(words, A):
        print(f"  {word:>{width}} " + " ".join(f"{p:5.2f}" for p in row.tolist()))


def run(args: argparse.Namespace) -> int:
    words = args.sentence.split()
    T = len(words)
    g = torch.Generator().manual_seed(args.seed)
    # Random embeddings stand in for a trained model's; the steps are the same.
    X = torch.randn(T, args.d_model, generator=g)
    Wq = torch.randn(args.d_model, args.d_k, generator=g) / args.d_model**0.5
    Wk = torch.randn(args.d_model, args.d_k, generator=g) / args.d_model**0.5
    Wv = torch.randn(args.d_model, args.d_v, generator=g) / args.d_model**0.5

    print(f"sentence: {args.sentence!r}  ({T} tokens, random embeddings)")
    _show("X: one embedding per token (T x d_model)", X)
    Q, K, V = X @ Wq, X @ Wk, X @ Wv
    _show("Q = X Wq (T x d_k)", Q)
    _show("K = X Wk (T x d_k)", K)
    _show("V = X Wv (T x d_v)", V)

    S = Q @ K.T
    _show("step 1, first matmul: compatibility matrix S = Q Kᵀ (T x T)", S)
    print(f"  score variance {S.var():.3f}")
    S_scaled = S / args.d_k**0.5
    _show(f"step 2, scale: S / sqrt(d_k) = S / {args.d_k**0.5:.2f}", S_scaled)
    print(f"  score variance {S_scaled.var():.3f} (dividing by sqrt(d_k) divides it by d_k)")
    if args.causal:
        S_scaled = S_scaled.masked_fill(~dotattn.masks.causal().to_dense(T, T), float("-inf"))
        print("  causal mask: entries above the diagonal set to -inf")
    A = torch.softmax(S_scaled, dim=-1)
    _show("step 3, row softmax: attention matrix A (T x T)", A)
    print(f"  every row sums to 1: max |row sum - 1| = {(A.sum(-1) - 1).abs().max():.1e}")
    _print_matrix(A, words)
    out = A @ V
    _show("step 4, second matmul: output A V (T x d_v)", out)

    result = dotattn.scaled_dot_product_attention(
        Q, K, V, is_causal=args.causal, return_weights=True, return_lse=True
    )
    print(
        f"\ndotattn.scaled_dot_product_attention gives the same: "
        f"max |difference| {(result.output - out).abs().max():.1e} in the output, "
        f"{(result.weights - A).abs().max():.1e} in the weights"
    )
    print(f"  {dotattn.explain(Q, K, V, is_causal=args.causal)}")
    print("\nmost attended word for each word:")
    width = max(len(w) for w in words)
    for word, row in zip(words, A):
        top = row.topk(min(2, T))
        picks = ", ".join(f"{words[i]} {p:.2f}" for p, i in zip(top.values, top.indices))
        print(f"  {word:>{width}} -> {picks}")
    return 0
