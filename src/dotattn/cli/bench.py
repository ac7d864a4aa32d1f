"""``dotattn bench``: every CPU engine next to torch SDPA, side by side in one run.

For each dtype the GEMM peak is measured first with torch.matmul in that dtype (and in
float32: an engine may compute half precisions with float32 GEMMs, so %peak is against
the faster of the two). Then, per length L, torch SDPA (its default CPU backend, on the
same inputs; a mask other than causal goes to torch as a dense bool ``attn_mask``) and
every registered engine that runs on CPU in that dtype are timed, interleaved run by run
(median of the repeats), so machine drift hits all alike. The reference engine is
skipped, and the run says so, where its L x L scores would exceed ``--reference-gib``.

Counted per record (shape legend: B batch, H heads, L = Lq = Lk, E head dim):

  GFLOP/s   4·B·H·L²·E · (fraction of allowed (query, key) pairs) / time; ×3.5 with
            --backward (the backward is 2.5× the forward)
  %peak     GFLOP/s against the GEMM peak above
  vs torch  torch's time / this time
  peak MiB  the torch profiler (profile_memory=True): bytes torch allocated on the CPU
            during one call, summed over its allocation and free events in time order,
            peak above what was live before the call (inputs not counted). Memory that
            does not go through torch's allocator (e.g. a kernel's stack tiles) is not seen.

``--sweep`` fits time ∝ L^p by least squares on log time against log L over the lengths,
per engine, and prints p next to the seeds' O(n²·d) claim: p ≈ 2 for full or causal
attention, ≈ 1 for a sliding window (its work grows as L·W). Fixed per-call costs pull p
below that at small L.

Writes bench.csv, bench.json and bench.png (GFLOP/s against L, log-x) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import dotattn
from dotattn import engines, masks
from dotattn.benchmarking import gemm_peak, peak_bytes, timed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TORCH = "torch"
MiB = 2**20


@dataclass(frozen=True)
class Record:
    """One (dtype, L, engine) measurement; ``engine`` is "torch" for torch SDPA.

    mask:       our mask as dotattn prints it ("none" for full attention)
    torch_mask: how torch was given it: "none", "is_causal" or "dense bool (L, L)"
    allowed:    fraction of (query, key) pairs the mask allows
    """

    dtype: str
    B: int
    H: int
    E: int
    L: int
    mask: str
    torch_mask: str
    allowed: float
    backward: bool
    engine: str
    ms: float
    gflops: float
    pct_peak: float
    speedup_vs_torch: float
    peak_mib: float
    gemm_peak_gflops: float


COLUMNS = [f.name for f in fields(Record)]


@dataclass(frozen=True)
class Case:
    """The problem timed at one length: the mask for our engines and what torch gets."""

    mask: masks.Mask | None
    torch_attn_mask: torch.Tensor | None  # (L, L) bool, or None
    torch_is_causal: bool
    allowed: float

    @property
    def torch_mask_name(self) -> str:
        if self.torch_attn_mask is not None:
            return f"dense bool {tuple(self.torch_attn_mask.shape)}"
        return "is_causal" if self.torch_is_causal else "none"


def make_case(L: int, causal: bool = False, window: int | None = None) -> Case:
    """The mask at length L: none, ``causal()``, or ``causal() & sliding_window(window)``.

    Causal alone reaches torch as ``is_causal=True``; a window reaches it as the dense
    (L, L) bool mask, which is what torch SDPA needs for it.
    """
    if window is not None:
        mask = masks.causal() & masks.sliding_window(window)
        dense = mask.to_dense(L, L)
        return Case(mask, dense, False, float(dense.float().mean()))
    if causal:
        return Case(masks.causal(), None, True, (L + 1) / (2 * L))
    return Case(None, None, False, 1.0)


def runnable_engines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: masks.Mask | None) -> tuple[list[str], dict[str, str]]:
    """Names of the registered engines that can run this problem, and why each other cannot."""
    names, skipped = [], {}
    for engine in engines.available():
        explanation = dotattn.explain(q, k, v, mask=mask, engine=engine.name)
        if explanation.engine is None:
            skipped[engine.name] = "; ".join(explanation.rejected.get(engine.name, ["cannot run it"]))
        else:
            names.append(engine.name)
    return names, skipped


def measure_length(dtype_name: str, L: int, *, B: int, H: int, E: int, peak: float,
                   causal: bool = False, window: int | None = None, backward: bool = False,
                   repeats: int = 5, reference_gib: float = 1.0,
                   memory: bool = True) -> tuple[list[Record], dict[str, str]]:
    """Time torch SDPA and every engine that can run q, k, v (B, H, L, E) in ``dtype_name``.

    Returns one record per contender, torch first, and {engine: why it was skipped}.
    ``peak`` is the GEMM GFLOP/s that %peak is measured against.
    """
    dtype = DTYPES[dtype_name]
    case = make_case(L, causal, window)
    flops = 4 * B * H * L * L * E * case.allowed * (3.5 if backward else 1.0)
    q, k, v = (torch.randn(B, H, L, E).to(dtype).requires_grad_(backward) for _ in range(3))
    grad = torch.randn(B, H, L, E).to(dtype)

    def call(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            out = fn()
            if backward:
                out.backward(grad)
        return go

    labels = [TORCH]
    fns = [call(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=case.torch_attn_mask, is_causal=case.torch_is_causal))]
    names, skipped = runnable_engines(q, k, v, case.mask)
    # The reference engine holds the (B, H, L, L) scores in float32 (and the weights, and
    # their gradients with --backward).
    score_bytes = B * H * L * L * 4 * (3 if backward else 2)
    if "reference" in names and score_bytes > reference_gib * 2**30:
        names.remove("reference")
        skipped["reference"] = (f"its L x L scores need {score_bytes / 2**30:.1f} GiB, "
                                f"above --reference-gib {reference_gib:g}")
    labels += names
    fns += [call(lambda n=n: dotattn.scaled_dot_product_attention(q, k, v, mask=case.mask, engine=n))
            for n in names]
    times = timed(fns, repeats)
    records = []
    for label, fn, seconds in zip(labels, fns, times):
        gflops = flops / seconds / 1e9
        records.append(Record(
            dtype=dtype_name, B=B, H=H, E=E, L=L, mask=str(case.mask) if case.mask is not None else "none",
            torch_mask=case.torch_mask_name, allowed=case.allowed, backward=backward, engine=label,
            ms=seconds * 1e3, gflops=gflops, pct_peak=100 * gflops / peak,
            speedup_vs_torch=times[0] / seconds,
            peak_mib=peak_bytes(fn) / MiB if memory else float("nan"), gemm_peak_gflops=peak))
    return records, skipped


def fit_exponent(lengths: Sequence[float], times: Sequence[float]) -> float:
    """p in time = c·L^p, by least squares on (log L, log time); needs two distinct lengths."""
    if len(lengths) != len(times) or len(set(lengths)) < 2:
        raise ValueError(f"fit_exponent needs times at two or more distinct lengths, got {list(lengths)}")
    x = [math.log(L) for L in lengths]
    y = [math.log(t) for t in times]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def exponents(records: Iterable[Record]) -> dict[tuple[str, str], float]:
    """{(dtype, engine): fitted p} for every contender timed at two or more lengths."""
    series: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        series.setdefault((r.dtype, r.engine), []).append(r)
    return {key: fit_exponent([r.L for r in rs], [r.ms for r in rs])
            for key, rs in series.items() if len({r.L for r in rs}) >= 2}


def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """Yields a step(label) function: a tqdm bar on stderr, or a plain counter without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False)

        def step(label: str) -> None:
            bar.set_description(label)
            bar.update()
        try:
            yield step
        finally:
            bar.close()
        return
    done = 0

    def count(label: str) -> None:
        nonlocal done
        done += 1
        print(f"\r[{done}/{total}] {label}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    yield count


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="time every CPU engine next to torch SDPA, side by side",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="float32, L 256 and 1024, B1 H4 E64, 3 repeats (other options still override)")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16 (default both)")
    p.add_argument("--lengths", default=None, help="comma-separated L (default 512,1024,2048,4096)")
    p.add_argument("--causal", action="store_true", help="causal mask (torch gets is_causal=True)")
    p.add_argument("--window", type=int, default=None,
                   help="causal() & sliding_window(W) (torch gets the dense bool mask)")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--heads", type=int, default=None, help="H (default 8)")
    p.add_argument("--batch", type=int, default=None, help="B (default 1)")
    p.add_argument("--head-dim", type=int, default=None, help="E (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5)")
    p.add_argument("--reference-gib", type=float, default=1.0,
                   help="skip the reference engine where its L x L scores exceed this (default 1)")
    p.add_argument("--sweep", action="store_true", help="fit time ∝ L^p per engine over the lengths")
    p.add_argument("--out", default="out/bench", help="folder for bench.csv, .json, .png (default out/bench)")
    p.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> dict:
    """The options with --quick's or the full run's defaults filled in."""
    quick = dict(dtype="float32", lengths="256,1024", heads=4, batch=1, head_dim=64, repeats=3)
    full = dict(dtype="float32,bfloat16", lengths="512,1024,2048,4096", heads=8, batch=1, head_dim=64, repeats=5)
    defaults = quick if args.quick else full
    s = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}
    for name in s["dtype"].split(","):
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r} is not benchmarked; use {' or '.join(DTYPES)}")
    s["dtypes"] = s.pop("dtype").split(",")
    s["lengths"] = [int(L) for L in s["lengths"].split(",")]
    return s


def _table(records: list[Record]) -> str:
    header = ["dtype", "L", "engine", "ms", "GFLOP/s", "%peak", "vs torch", "peak MiB"]
    rows = [[r.dtype, str(r.L), r.engine, f"{r.ms:.2f}", f"{r.gflops:.1f}", f"{r.pct_peak:.0f}%",
             f"{r.speedup_vs_torch:.2f}x", f"{r.peak_mib:.1f}"] for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def _plot(records: list[Record], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Record]] = {}
    for r in records:
        series.setdefault(f"{r.engine} {r.dtype}", []).append(r)
    for label, rs in series.items():
        ax.plot([r.L for r in rs], [r.gflops for r in rs], marker="o", label=label,
                linestyle="--" if label.startswith(TORCH) else "-")
    for dtype in dict.fromkeys(r.dtype for r in records):
        ax.axhline(next(r.gemm_peak_gflops for r in records if r.dtype == dtype), color="grey",
                   linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L (Lq = Lk)")
    ax.set_ylabel("GFLOP/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title + " (dotted: GEMM peak)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    B, H, E = s["batch"], s["heads"], s["head_dim"]
    case = make_case(1, args.causal, args.window)
    what = (f"{'forward+backward' if args.backward else 'forward'}, B{B} H{H} E{E}, "
            f"mask {case.mask if case.mask is not None else 'none'}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {what}")
    records: list[Record] = []
    notes: list[str] = []  # GEMM peaks and skipped engines, printed after the progress bar
    peaks: dict[str, float] = {}
    start = time.perf_counter()
    progress = _progress(len(s["dtypes"]) * (1 + len(s["lengths"])))
    step = next(progress)
    for dtype_name in s["dtypes"]:
        n = 1024 if args.quick else 2048
        peak = gemm_peak(DTYPES[dtype_name], n=n)
        line = f"{dtype_name}: GEMM peak {peak:.1f} GFLOP/s (torch.matmul {n}², this run)"
        if dtype_name != "float32":
            # An engine may compute half precisions with float32 GEMMs where those are faster.
            fp32 = peaks.get("float32") or gemm_peak(torch.float32, n=n)
            line += f"; float32 {fp32:.1f}; %peak is against {max(peak, fp32):.1f}"
            peak = max(peak, fp32)
        peaks[dtype_name] = peak
        step(f"{dtype_name} GEMM peak")
        notes.append(line)
        for L in s["lengths"]:
            recs, skipped = measure_length(dtype_name, L, B=B, H=H, E=E, peak=peak, causal=args.causal,
                                           window=args.window, backward=args.backward,
                                           repeats=s["repeats"], reference_gib=args.reference_gib)
            records += recs
            for name, why in skipped.items():
                notes.append(f"skipped {name} ({dtype_name}, L {L}): {why}")
            step(f"{dtype_name} L {L}")
    next(progress, None)
    elapsed = time.perf_counter() - start
    for line in notes:
        print(line)
    print(_table(records))

    fitted = exponents(records) if args.sweep else {}
    if args.sweep:
        claim = ("≈ 1: a sliding window's work grows as L·W" if args.window is not None
                 else "≈ 2: O(n²·d) for full or causal attention")
        print(f"cost exponent, time ∝ L^p fitted over L = {', '.join(map(str, s['lengths']))} "
              f"(seeds' claim: p {claim}; fixed per-call costs pull p lower at small L):")
        for (dtype_name, engine), p in fitted.items():
            print(f"  {engine:>12} {dtype_name}: p = {p:.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "what": what,
            "repeats": s["repeats"], "gemm_peak_gflops": peaks, "memory": "torch profiler, profile_memory=True",
            "skipped": [line for line in notes if line.startswith("skipped")],
            "exponents": [{"dtype": d, "engine": e, "p": p} for (d, e), p in fitted.items()]}
    with open(out / "bench.json", "w") as f:
        json.dump({"meta": meta, "records": [asdict(r) for r in records]}, f, indent=1)
    written = [out / "bench.csv", out / "bench.json"]
    try:
        _plot(records, out / "bench.png", what)
        written.append(out / "bench.png")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'dotattn[plots]')")
    print(f"wrote {', '.join(map(str, written))} ({elapsed:.1f} s measuring)")
    return 0
