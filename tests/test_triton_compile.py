"""The triton engine's kernels compile for real NVIDIA targets (sm_90, sm_80), with no GPU.

The rest of the suite runs the kernels in Triton's interpreter, which never compiles them.
Here the engine's own launch path runs on CPU tensors (forward and backward, so every
kernel and the argument plumbing are the real ones) with its kernels swapped for
launchers that only compile for a target: Triton's binder specializes the arguments as a
launch would, then ``triton.compile`` runs every stage down to a cubin (the NVIDIA
backend ships ptxas, so no driver or GPU is needed). Instead of timing configs, the tuner
compiles every config its shared-memory filter keeps.

Triton decides at import whether its jit functions compile or interpret, and the suite's
conftest sets TRITON_INTERPRET=1 before that, so the compiling runs in subprocesses
without it (this file run as a script: sm_90's problems split between two processes,
``--shard=0/2`` and ``--shard=1/2``, and sm_80's in a third, side by side), which print one
line per compiled kernel.

Variants (one problem each, forward + backward): float16, bfloat16, float32 exact and
TF32, head dims 64, 80, 128, 256; masks: none, row spans, a boolean tensor, a
block-sparse layout, a float bias (broadcast: atomic dS, and deterministic), dropout,
logit soft-capping with a float bias, a monitored forward (row statistics), and everything at once. Then the split-K engine's decoding kernels (forward only): GQA
and MQA steps, with a KV cache's row spans and without a mask, in each dtype, and one monitored.
Then the kernels as the torch operators of ``dotattn.engines.triton.ops`` launch them (the
first config that fits, tile lists from row spans), forward and backward, on sm_90. sm_80 compiles a subset (no mask in float16, everything at once
in bfloat16). Each kernel compiles in the tuner's smallest fitting config, to keep the
test near a minute on a 2-core machine (about 2 minutes of compiling, both targets); ``python tests/test_triton_compile.py 90
--every-config`` compiles every fitting config (about 8 minutes there).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import subprocess
import sys
import time

import pytest

import torch

TARGETS = {"sm_90": 90, "sm_80": 80}


def _missing() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed"
    root = os.path.dirname(spec.origin)
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "triton has no NVIDIA backend"
    ptxas = os.path.join(root, "backends", "nvidia", "bin", "ptxas")
    if not os.access(ptxas, os.X_OK) or subprocess.run([ptxas, "--version"], capture_output=True).returncode != 0:
        return f"triton's ptxas ({ptxas}) is missing or does not run"
    return None


def _resource_usage(cubin: bytes) -> str:
    """REG, STACK, LOCAL (spills land in local memory) as cuobjdump reads them from a cubin:
    a CompiledKernel gets n_regs and n_spills only from a driver loading it."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":") for part in text.split() if part.split(":")[0] in ("REG", "STACK", "LOCAL"))
    return f"regs={fields.get('REG')} stack={fields.get('STACK')} local={fields.get('LOCAL')}"


# ---------------------------------------------------------------------------
# The subprocess: the engine's launch path with compile-only launchers
# ---------------------------------------------------------------------------


def _variants():
    """(name, dtype, E, tf32, engine options, prepare kwargs builder) per problem."""
    from dotattn import masks

    B, H, L = 2, 2, 256

    def spans():
        return dict(mask=masks.causal(align="bottom_right") & masks.padding([L, 200]))

    def allowed():
        return dict(mask=masks.dense(torch.rand(L, L, generator=torch.Generator().manual_seed(0)) > 0.3))

    def layout():
        lay = torch.rand(H, L // 64, L // 64, generator=torch.Generator().manual_seed(0)) > 0.5
        return dict(mask=masks.block_sparse(lay, 64))

    def bias():
        return dict(attn_mask=torch.randn(L, L))  # shared by (batch, head): atomic dS unless deterministic

    def dropout():
        return dict(dropout_p=0.1, generator=torch.Generator().manual_seed(0))

    def everything():
        lay = torch.rand(H, L // 64, L // 64, generator=torch.Generator().manual_seed(0)) > 0.2
        return dict(mask=masks.causal() & masks.block_sparse(lay, 64)
                    & masks.dense(torch.rand(L, L, generator=torch.Generator().manual_seed(0)) > 0.1),
                    dropout_p=0.1, generator=torch.Generator().manual_seed(0))

    def softcap():
        return dict(softcap=30.0, attn_mask=torch.randn(L, L))  # the cap, and the mask's dS taken after it

    def plain():
        return {}

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    out = [
        ("none", f16, 64, False, {}, plain),
        ("none", bf16, 128, False, {}, plain),
        ("spans", bf16, 80, False, {}, spans),
        ("spans", f16, 256, False, {}, spans),
        ("allowed", bf16, 128, False, {}, allowed),
        ("layout", f16, 64, False, {}, layout),
        ("bias atomic", bf16, 64, False, {}, bias),
        ("bias deterministic", f16, 128, False, dict(deterministic=True), bias),
        ("dropout", bf16, 64, False, {}, dropout),
        ("everything", bf16, 128, False, {}, everything),
        ("softcap", bf16, 128, False, {}, softcap),
        ("monitored", bf16, 128, False, {}, spans),  # the forward computes the Monitor's row statistics
        ("spans", f32, 64, False, {}, spans),
        ("spans tf32", f32, 128, True, {}, spans),
    ]
    return out


def _decode_variants(subset: bool) -> list[tuple]:
    """(dtype, E, Hq, Hkv, masked, monitored) per decoding step."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    every = [(bf16, 128, 32, 8, True, False), (f16, 64, 32, 1, False, False), (f32, 128, 32, 8, True, False),
             (f16, 256, 8, 8, True, False), (bf16, 128, 32, 8, True, True)]
    return every[:1] if subset else every


def _compile_all(arch: int, subset: bool, every_config: bool, shard: tuple[int, int] = (0, 1)) -> None:
    """Compiles the variants' kernels for sm_<arch>; shard (i, n): only every n-th problem from the i-th."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from dotattn._inputs import prepare
    from dotattn.engines import triton as engine_module
    from dotattn.engines.triton import launch

    assert not launch.interpreting()
    from dotattn.engines.triton import _bwd, _decode, _fwd
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    current = {}

    class Launcher:
        """``kernel[grid](...)`` that compiles for ``target`` and launches nothing."""

        def __init__(self, fn):
            self.fn = fn
            self.binder = create_function_from_signature(fn.signature, fn.params, backend)

        def __getitem__(self, grid):
            return self.compile

        def compile(self, *args, **kwargs):
            fn = self.fn
            bound, specialization, options = self.binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            key = (fn.fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())),
                   str(sorted(attrs.items())), options.num_warps, options.num_stages)
            if key in seen:
                return
            seen.add(key)
            consts = {fn.arg_names[path[0]]: v for path, v in constexprs.items()}
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            except Exception as e:
                print(f"FAIL\t{current['name']}\t{fn.fn.__name__}\t{consts}\t{type(e).__name__}: {e}", flush=True)
                failures.append(e)
                return
            regs = _resource_usage(compiled.asm["cubin"])
            blocks = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N") if k in consts)
            print(f"OK\tsm_{arch}\t{current['name']}\t{fn.fn.__name__}\t{blocks}\tw{options.num_warps}"
                  f"s{options.num_stages}\t{regs}"
                  f"\tshared={compiled.metadata.shared}\t{time.perf_counter() - start:.1f}s", flush=True)

    class Module:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return Launcher(getattr(self.module, name))

    seen, failures = set(), []
    fake = launch._Kernels(Module(_fwd), Module(_bwd), Module(_decode), interpreted=False)
    launch.kernels = lambda: fake

    def tuned(key, configs, launch):  # the configs that fit: every one, or the smallest (fast to compile)
        for config in configs if every_config else configs[-1:]:
            launch(config)
        return configs[-1]

    launch.tuned_config = tuned
    post_init = getattr(launch.Call.__post_init__, "engine_s", launch.Call.__post_init__)

    def as_on_cuda(call):  # the engine takes TF32 from torch's flag for CUDA tensors only; these are CPU ones
        post_init(call)
        if call.problem.query.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            call.precision = "tf32"
        if call.traced:  # the operators split 16-bit GEMMs on CPU tensors only
            call.split = False

    as_on_cuda.engine_s = post_init
    launch.Call.__post_init__ = as_on_cuda
    problems = itertools.count()  # each problem's index, for the shard
    for name, dtype, E, tf32, options, extra in _variants():
        if subset and name not in ("none", "everything"):
            continue
        if next(problems) % shard[1] != shard[0]:
            continue
        current["name"] = f"{name} {str(dtype).removeprefix('torch.')} E={E}"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, 256, E, generator=g).to(dtype).requires_grad_() for _ in range(3))
        problem = dataclasses.replace(prepare(q, k, v, **extra()), stats=name == "monitored")
        engine = engine_module.TritonEngine(split_half_gemms=False, **options)
        result = engine.run(problem)
        result.output.float().sum().backward()
    from dotattn import masks
    for dtype, E, Hq, Hkv, masked, monitored in _decode_variants(subset):
        if next(problems) % shard[1] != shard[0]:
            continue
        current["name"] = (f"decode {str(dtype).removeprefix('torch.')} E={E} {Hq}/{Hkv}{' spans' if masked else ''}"
                           f"{' monitored' if monitored else ''}")
        torch.backends.cuda.matmul.allow_tf32 = False
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, Hq, 1, E, generator=g).to(dtype)
        k, v = (torch.randn(2, Hkv, 4096, E, generator=g).to(dtype) for _ in range(2))
        mask = masks.padding(torch.tensor([4096, 3000]), side="left") & masks.causal(align="bottom_right")
        problem = dataclasses.replace(prepare(q, k, v, mask=mask if masked else None, enable_gqa=True),
                                      stats=monitored)
        launch.split_k_decode(problem, parts=4)
    # The kernels as the torch operators launch them (dotattn.engines.triton.ops), in the first
    # config that fits, with tile lists from the spans: launched directly (wrap_triton would
    # trace them), forward and backward.
    from dotattn.engines.split_k import traced_spans
    from dotattn.engines.triton import ops

    launch.Call._kernel = lambda call, kernel: kernel
    for dtype in [] if subset else [torch.bfloat16]:
        if next(problems) % shard[1] != shard[0]:
            continue
        current["name"] = f"operator spans {str(dtype).removeprefix('torch.')} E=128"
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, 256, 128, generator=g).to(dtype) for _ in range(3))
        lo, hi = traced_spans(masks.causal() & masks.padding(torch.tensor([256, 200])), 256, 256, (2, 2, 256),
                              flag_oversized=False)
        out, lse = ops._forward(q, k, v, lo, hi, 128 ** -0.5, 0.0)
        ops._backward(torch.randn_like(out), q, k, v, out, lse, lo, hi, 128 ** -0.5, 0.0)
    print(f"DONE\tsm_{arch}\t{len(seen)} kernels\t{len(failures)} failures", flush=True)


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_every_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # compiling is single-threaded: sm_90's problems in two processes, sm_80's subset in a third
    jobs = [["90", "--shard=0/2"], ["90", "--shard=1/2"], ["80"]]
    runs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *job], env=env, cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    outputs = [run.communicate(timeout=600) for run in runs]  # all of them, so that none is left running
    lines = [line for stdout, _ in outputs for line in stdout.splitlines()]
    failed = [line for line in lines if line.startswith("FAIL")]
    assert all(run.returncode == 0 for run in runs) and not failed, \
        "\n".join(failed) + "".join(stderr[-4000:] for _, stderr in outputs)
    done = [line for line in lines if line.startswith("DONE")]
    assert len(done) == len(jobs), "\n".join(lines[-40:])
    compiled = {tuple(line.split("\t")[1:4:2]) for line in lines if line.startswith("OK")}
    kernels = {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "decode_parts", "decode_merge"}
    assert compiled == {(arch, k) for arch in ("sm_90", "sm_80") for k in kernels}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    every = "--every-config" in sys.argv
    shard = next((tuple(map(int, a.removeprefix("--shard=").split("/"))) for a in sys.argv if a.startswith("--shard=")),
                 (0, 1))
    for arch in [int(a) for a in sys.argv[1:] if a.isdigit()] or [90]:
        _compile_all(arch, subset=arch != 90, every_config=every, shard=shard)
