"""GPU speed of the triton engine next to torch SDPA, FlexAttention and FlashAttention, side by side.

    python benchmarks/gpu.py                        # L 1k..16k, E 64/128, fp16/bf16, full/causal/window/documents
    python benchmarks/gpu.py --lengths 4096 --dims 128 --dtypes float16 --masks full,causal --markdown
    python benchmarks/gpu.py --check                # first the triton and split-K engines vs the float64 oracle on this GPU
    python benchmarks/gpu.py --json out/gpu.json    # also save every figure
    python benchmarks/gpu.py --decode               # decoding steps against a KV cache, as % of a copy

Every case runs, in one process and one after the other, the triton engine, torch SDPA's
flash and cuDNN backends (full and causal only: they take no other mask; for masked cases
torch's memory-efficient backend with the mask as a dense tensor stands in), FlexAttention
compiled (its compile time left out of the timings), and FlashAttention when the
flash_attn package imports (sliding windows through window_size, documents through
flash_attn_varlen_func). Each is timed with triton.testing.do_bench, the forward alone and
the backward alone (retain_graph). Tokens per batch are fixed at 16k (B = 16384 / L) and
the model width at 2048 (H = 2048 / E), as in FlashAttention's benchmarks.

TFLOP/s count 4·B·H·L²·E·density for the forward and 2.5x that for the backward, where
density is the fraction of (query, key) pairs the mask allows (from its row spans), so a
masked case is credited only with the work it needs. "err" is the triton engine's max
|difference| from torch SDPA in the same dtype (L <= 4096), a sanity check, not the test.

--decode times one decoding step, q (B, 32, 1, 128) against a KVCache of L positions with
8 kv heads (its views and its mask, as benchmarks/decode.py gives the CPU engines), for
L 4k..128k and B 1, 8: dotattn's auto (the split-K Triton kernels), the triton engine
forced (its prefill kernel: one program per query head), and torch SDPA with enable_gqa.
Each reports K+V bytes read per second and that as a % of a device copy of 1 GiB (read +
write) timed in the same run; do_bench flushes the L2 cache before every run, so the
cache streams from HBM. "err" is split-K's max |difference| from torch SDPA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import dotattn
from dotattn import masks

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WIDTH = 2048  # model width: H = WIDTH / E
TOKENS = 16384  # tokens per batch: B = TOKENS / L
DOCUMENTS = 4  # the documents case packs this many equal documents per row


def make_mask(name: str, L: int, device: torch.device) -> masks.Mask | None:
    if name == "full":
        return None
    if name == "causal":
        return masks.causal()
    if name.startswith("window"):  # causal sliding window of N keys before the diagonal
        return masks.causal() & masks.sliding_window(int(name.removeprefix("window")))
    if name == "documents":
        return masks.documents(torch.arange(L, device=device) * DOCUMENTS // L)
    raise ValueError(f"unknown mask {name!r}; use full, causal, windowN or documents")


def density(mask: masks.Mask | None, L: int) -> float:
    """The fraction of (query, key) pairs the mask allows, from its row spans (O(L))."""
    if mask is None:
        return 1.0
    lo, hi = mask.row_spans(L, L)
    return float((hi - lo).clamp(min=0).sum()) / (L * L)


@dataclass
class Result:
    candidate: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    skipped: str | None = None


@dataclass
class Case:
    dtype: str
    E: int
    mask: str
    L: int
    B: int
    H: int
    density: float
    err: float | None = None
    results: list[Result] = field(default_factory=list)

    def flops(self) -> float:
        return 4.0 * self.B * self.H * self.L * self.L * self.E * self.density


def candidates(name: str, mask: masks.Mask | None, q, k, v, L: int) -> dict[str, Callable[[], torch.Tensor] | str]:
    """Each contender as a forward closure on (B, H, L, E) q, k, v, or the reason it cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Callable[[], torch.Tensor] | str] = {}
    out["triton"] = lambda: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine="triton")
    causal = name == "causal"
    for label, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if name in ("full", "causal"):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            out[label] = run
        else:
            out[label] = "takes no mask besides causal"
    if name not in ("full", "causal"):
        dense = mask.to_dense(L, L, device=q.device)

        def efficient():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        out["sdpa-efficient+mask"] = efficient
    out["flex"] = _flex(name, q, k, v, L)
    out["flash-attn"] = _flash_attn(name, q, k, v, L)
    return out


def _flex(name: str, q, k, v, L: int) -> Callable[[], torch.Tensor] | str:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        return f"not importable ({error})"
    flex = torch.compile(flex_attention, dynamic=False)
    if name == "full":
        return lambda: flex(q, k, v)
    if name == "causal":
        def mod(b, h, i, j):
            return j <= i
    elif name.startswith("window"):
        w = int(name.removeprefix("window"))

        def mod(b, h, i, j):
            return (j <= i) & (i - j <= w)
    else:
        docs = torch.arange(L, device=q.device) * DOCUMENTS // L

        def mod(b, h, i, j):
            return docs[i] == docs[j]
    block_mask = create_block_mask(mod, None, None, L, L, device=q.device)
    return lambda: flex(q, k, v, block_mask=block_mask)


def _flash_attn(name: str, q, k, v, L: int) -> Callable[[], torch.Tensor] | str:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as error:
        return f"not importable ({error})"
    if q.dtype == torch.float32:
        return "takes float16 and bfloat16 only"
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash_attn's layout is (B, L, H, E)
    if name == "documents":
        B, _, H, E = qt.shape
        lengths = torch.full((B * DOCUMENTS,), L // DOCUMENTS, dtype=torch.int32, device=q.device)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        flat = [x.reshape(B * L, H, E) for x in (qt, kt, vt)]
        return lambda: flash_attn_varlen_func(*flat, cu, cu, L // DOCUMENTS, L // DOCUMENTS)
    window = (int(name.removeprefix("window")), 0) if name.startswith("window") else (-1, -1)
    causal = name != "full"
    return lambda: flash_attn_func(qt, kt, vt, causal=causal, window_size=window)


def measure(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], backward: bool) -> tuple[float, float | None]:
    """Forward ms and backward ms (None when not asked), by triton.testing.do_bench."""
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(fn, warmup=25, rep=100)
    if not backward:
        return fwd, None
    out = fn()
    d_out = torch.randn_like(out)
    bwd = do_bench(lambda: out.backward(d_out, retain_graph=True), warmup=25, rep=100, grad_to_none=inputs)
    return fwd, bwd


def run_case(dtype_name: str, E: int, mask_name: str, L: int, backward: bool) -> Case:
    device = torch.device("cuda")
    dtype = DTYPES[dtype_name]
    B, H = max(1, TOKENS // L), max(1, WIDTH // E)
    mask = make_mask(mask_name, L, device)
    case = Case(dtype_name, E, mask_name, L, B, H, density(mask, L))
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, device=device, dtype=dtype, generator=g).requires_grad_(backward)
               for _ in range(3))
    contenders = candidates(mask_name, mask, q, k, v, L)
    for label, fn in contenders.items():
        if isinstance(fn, str):
            case.results.append(Result(label, skipped=fn))
            continue
        try:
            fn()  # compile, autotune
            fwd, bwd = measure(fn, [q, k, v], backward)
            case.results.append(Result(label, fwd, bwd))
        except Exception as error:  # one contender failing must not lose the others' figures
            case.results.append(Result(label, skipped=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"))
        torch.cuda.empty_cache()
    if L <= 4096:
        with torch.no_grad():
            ours = contenders["triton"]()
            dense = None if mask is None else mask.to_dense(L, L, device=device)
            theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            case.err = float((ours.float() - theirs.float()).abs().max())
    return case


def print_case(case: Case, markdown: bool, previous: list[str] | None) -> list[str]:
    """One row of figures (TFLOP/s), under a new header when the contenders changed; returns them."""
    names = [r.candidate for r in case.results if r.skipped is None]
    if names != previous:
        cols = ["dtype", "E", "mask", "L", "B×H"] + [f"{n} fwd" for n in names] + [f"{n} bwd" for n in names] + ["err"]
        print("| " + " | ".join(cols) + " |" if markdown else "  ".join(f"{c:>14}" for c in cols))
        if markdown:
            print("|" + "---|" * len(cols))
        else:
            print()
    tf = case.flops() / 1e12

    def rate(ms: float | None, factor: float) -> str:
        return "-" if ms is None else f"{tf * factor / (ms / 1e3):.0f}"

    done = [r for r in case.results if r.skipped is None]
    cells = [case.dtype, str(case.E), case.mask, str(case.L), f"{case.B}×{case.H}"]
    cells += [rate(r.fwd_ms, 1.0) for r in done] + [rate(r.bwd_ms, 2.5) for r in done]
    cells.append("-" if case.err is None else f"{case.err:.1e}")
    print("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>14}" for c in cells))
    for r in case.results:
        if r.skipped is not None and not markdown:
            print(f"    {r.candidate}: skipped, {r.skipped}")
    return names


def check() -> bool:
    """The triton engine, then the split-K engine's decoding kernels, against the float64 oracle
    on this GPU, under the 2x rule."""
    from dotattn.testing import compare_to_oracle

    ok = True
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for mask_name in ("full", "causal", "window256", "documents"):
            for E, Hkv in ((64, 8), (80, 2), (128, 1)):
                L = 1000
                q = torch.randn(2, 8, L, E, device=device, dtype=dtype, generator=g)
                k, v = (torch.randn(2, Hkv, L, E, device=device, dtype=dtype, generator=g) for _ in range(2))
                results = compare_to_oracle(q, k, v, engine="triton", mask=make_mask(mask_name, L, device),
                                            enable_gqa=True)
                verdict = all(r.ok for r in results)
                ok &= verdict
                print(f"{str(dtype).removeprefix('torch.'):>9} {mask_name:>10} E={E:<4} Hkv={Hkv}: "
                      + ("ok" if verdict else "FAIL ") + "  " + "; ".join(
                          f"{r.quantity} {r.error:.1e}/{r.bound:.1e}" for r in results))
    return ok & check_decode(device)


def check_decode(device: torch.device, engine: str = "split_k") -> bool:
    """The split-K engine's decoding kernels against the float64 oracle under the 2x rule: steps of
    1 and 4 queries against a left-padded KV cache's mask (GQA and MQA). Forward only: inputs that
    require grad run on the triton engine, which the checks above cover."""
    from dotattn.testing import compare_to_oracle

    ok = True
    g = torch.Generator(device=device).manual_seed(0)
    mask = masks.padding(torch.tensor([3000, 4100], device=device), side="left") & masks.causal(align="bottom_right")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for Lq, Hkv in ((1, 8), (4, 1)):
            q = torch.randn(2, 32, Lq, 128, device=device, dtype=dtype, generator=g)
            k, v = (torch.randn(2, Hkv, 4100, 128, device=device, dtype=dtype, generator=g) for _ in range(2))
            results = compare_to_oracle(q, k, v, engine=engine, mask=mask, enable_gqa=True, backward=False)
            verdict = all(r.ok for r in results)
            ok &= verdict
            print(f"{str(dtype).removeprefix('torch.'):>9} decode Lq={Lq} Hkv={Hkv}: " + ("ok" if verdict else "FAIL ")
                  + "  " + "; ".join(f"{r.quantity} {r.error:.1e}/{r.bound:.1e}" for r in results))
    return ok


def decode_table(dtype_names: list[str], lengths: list[int], batches: list[int], device: torch.device,
                 copy_numel: int = 2**28) -> None:
    """The --decode table (see the module docstring); copy_numel float32 for the copy (1 GiB)."""
    from triton.testing import do_bench

    from benchmarks.decode import decoding_step

    src = torch.ones(copy_numel, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), warmup=25, rep=100) / 1e3) / 1e9
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write); K+V GB/s and % of it below")
    names = ["split_k (auto)", "triton (prefill kernel)", "torch SDPA"]
    print(f"{'dtype':>9} {'B':>2} {'L':>7} {'K+V MB':>7} " + " ".join(f"{n:>24}" for n in names) + f" {'err':>8}")
    for dtype_name in dtype_names:
        for B in batches:
            for L in lengths:
                q, k, v, mask = decoding_step(B, 32, 8, L, DTYPES[dtype_name], device=device)
                fns = [lambda: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True),
                       lambda: dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True,
                                                                    engine="triton"),
                       lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)]
                nbytes = 2 * k.numel() * k.element_size()
                cells = []
                with torch.no_grad():
                    for fn in fns:
                        fn()  # compile, autotune
                        gbs = nbytes / (do_bench(fn, warmup=25, rep=100) / 1e3) / 1e9
                        cells.append(f"{gbs:7.0f} GB/s {100 * gbs / copy_gbs:5.0f}%")
                    err = float((fns[0]().float() - fns[2]().float()).abs().max())
                print(f"{dtype_name:>9} {B:>2} {L:>7} {nbytes / 1e6:7.0f} " + " ".join(f"{c:>24}" for c in cells)
                      + f" {err:8.1e}", flush=True)
                del q, k, v, mask
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--masks", default="full,causal,window256,documents")
    ap.add_argument("--no-backward", action="store_true", help="time the forward only")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for the README)")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--check", action="store_true", help="first check the triton engine against the oracle")
    ap.add_argument("--decode", action="store_true",
                    help="decoding steps instead (--lengths default 4096..131072, --dtypes, --batches)")
    ap.add_argument("--batches", default="1,8", help="batch sizes for --decode")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False on this "
                         f"machine (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                         "run it on a GPU machine")
    try:
        import triton
    except ImportError:
        raise SystemExit("benchmarks/gpu.py needs triton for the triton engine: "
                         "pip install 'dotattn[triton]'") from None
    device_name = torch.cuda.get_device_name()
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    if args.check and not check():
        raise SystemExit("an engine breaks the 2x rule on this GPU (see above); figures would mean nothing")
    if args.decode:
        lengths = "4096,16384,65536,131072" if args.lengths == ap.get_default("lengths") else args.lengths
        decode_table(args.dtypes.split(","), [int(n) for n in lengths.split(",")],
                     [int(b) for b in args.batches.split(",")], torch.device("cuda"))
        return

    cases = []
    names = None
    for dtype_name in args.dtypes.split(","):
        for E in (int(e) for e in args.dims.split(",")):
            for mask_name in args.masks.split(","):
                for L in (int(n) for n in args.lengths.split(",")):
                    case = run_case(dtype_name, E, mask_name, L, not args.no_backward)
                    names = print_case(case, args.markdown, names)
                    cases.append(case)
                    sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                         "triton": triton.__version__, "cases": [asdict(c) for c in cases]}, indent=1))


if __name__ == "__main__":
    main()
