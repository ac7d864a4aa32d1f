"""The Triton engine: fused GPU kernels for the forward and the backward, every mask.

The kernels (``_fwd.py``, ``_bwd.py``) are imported on the first run, not with dotattn:
dotattn imports without triton, and Triton decides when a ``@triton.jit`` function is
created whether it compiles for the GPU or runs in its interpreter (``TRITON_INTERPRET=1``).
In the interpreter the engine takes CPU tensors, so the test suite runs it on machines
without a GPU; ``engine="auto"`` never picks it for CPU tensors.

The package: ``configs.py`` (block sizes), ``mask_args.py`` (the mask as the kernels read
it), ``launch.py`` (one problem as launches) and the kernels. What the kernels get from a
problem (``launch.Call``):

    q, k, v     (N, H, L, D) views of the inputs by strides: batch broadcasts and
                non-contiguous layouts are read in place, query head h reads kv head
                h // G (GQA/MQA), K and V are never copied per query head
    tile lists  the mask's ``block_map`` as, per query block, the FULL tiles and the
                PARTIAL tiles (EMPTY ones are not listed), and transposed for dk/dv
    spans       lo, hi int32 (Nm, Hm, Lq): the row spans of the mask's leaves that have
                them (causal in both alignments, windows, padding, prefix-LM, sorted
                documents), evaluated in the kernel on PARTIAL tiles
    layout      a block-sparse leaf's layout, one entry per layout block
    allowed     a boolean rest of the mask (dense, unsorted documents, | without spans,
                a second block-sparse leaf): the user's tensor read tile by tile in
                place, or the rest's ``to_dense`` when it is a combination
    bias        a float rest: read tile by tile; its gradient is dS, summed by autograd
                over the dims the bias broadcasts

Block sizes are autotuned per problem class on the GPU (configs filtered by the head
dim) and fixed in the interpreter (``block_m``, ``block_n`` override both).

Numerics: float32 runs exact ("ieee" dots), TF32 only when the user allows it through
``torch.backends.cuda.matmul.allow_tf32``. float16/bfloat16 operands enter the MMAs as
they are, accumulating in float32; P and dS are rounded to the input dtype for their
GEMMs, once on CUDA (as FlashAttention and torch's GPU kernels), as hi + lo halves on
CPU, where torch's kernels, the 2x rule's baseline there, keep them in float32.
dq, dk, dv are deterministic by construction: no atomics (dk/dv are summed over a GQA
group inside one program, dq has its own kernel). A float mask shared by batch rows or
heads gets its gradient by atomic adds into a buffer of its own size, unless
``deterministic`` (or torch.use_deterministic_algorithms): then each (batch, head)
stores its dS, O(B·H·Lq·Lk) memory, and torch sums them. NaN/inf inputs: the kernels run on copies with
them zeroed, then the outputs that may see one become NaN as in the reference engine
(``dotattn._nonfinite.mark_visible_garbage``, an O(Lq·Lk) pass that only such inputs pay).
``return_weights`` is rebuilt from the lse in torch ops, O(Lq·Lk) like the weights themselves.
"""

from __future__ import annotations

import torch

from dotattn._inputs import Problem
from dotattn._layout import heads_uncanonical
from dotattn._nonfinite import mark_visible_garbage
from dotattn.engines.base import Engine, Support
from dotattn.engines.registry import register
from dotattn.engines.triton.configs import decode_rows
from dotattn.engines.triton.launch import (
    MISSING,
    Call,
    interpreting,
    kernel_lse,
    natural_lse,
    on_device,
    support,
    unavailable,
)
from dotattn.engines.triton.mask_args import MaskParts

__all__ = ["MISSING", "TritonEngine", "decode_rows"]


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The mask's float part as the kernels read it: the engine contract hands gradients
    back itself, so autograd need not reach the user's tensors through it."""
    return None if bias is None else bias.detach()


class TritonEngine(Engine):
    name = "triton"
    description = "fused Triton kernels (forward, and dk/dv + dq backward) for CUDA; every mask; O(L) memory"
    # Among the engines that run CUDA tensors it outranks the reference engine; the tiled
    # engine is CPU-only, so their order decides nothing (ranked below it, a CPU problem
    # never even asks the interpreter).
    priority = 5

    def __init__(self, block_m: int | None = None, block_n: int | None = None,
                 split_half_gemms: bool | None = None, deterministic: bool | None = None) -> None:
        self.block_m = block_m  # None: autotuned on the GPU, INTERPRETER_BLOCKS in the interpreter
        self.block_n = block_n
        # float16/bfloat16: P and dS are rounded to the input dtype for their GEMMs. On CUDA
        # once, as FlashAttention and torch's own GPU kernels do; on CPU (the interpreter) as
        # hi + lo halves, since torch's CPU kernels, the baseline there, keep them in float32.
        # None: decided by the device; True/False: always.
        self.split_half_gemms = split_half_gemms
        # dq, dk, dv are deterministic always; this decides a broadcast float mask's gradient.
        # None: torch.use_deterministic_algorithms decides.
        self.deterministic = deterministic

    def _split(self, problem: Problem) -> bool:
        if self.split_half_gemms is None:
            return problem.device_type != "cuda"
        return self.split_half_gemms

    @property
    def support(self) -> Support:
        return support()

    def extra_reasons(self, problem: Problem) -> list[str]:
        return unavailable(problem)

    def auto_skip(self, problem: Problem, after: tuple[str, ...] | None = None) -> str | None:
        if problem.device_type == "cpu":
            return "CPU tensors run in Triton's interpreter, which is for tests; engine='triton' forces it"
        return None

    def detail(self, problem: Problem) -> str:
        how = "Triton interpreter" if interpreting() else "compiled Triton kernels"
        parts = MaskParts.of(problem)
        masked = [name for name, part in (("row spans", parts.lo), ("a block-sparse layout", parts.layout),
                                          ("a boolean tensor", parts.allowed), ("a bias", parts.bias))
                  if part is not None]
        return how + (", partial tiles masked by " + " and ".join(masked) if masked else "")

    def plan(self, problem: Problem) -> Call:
        """How this engine runs ``problem``: the kernels' call (the mask's parts derived once per problem)."""
        p = problem
        blocks = None if self.block_m is None else (self.block_m, self.block_n or self.block_m)
        deterministic = self.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        parts = p.derived.get(MaskParts)
        if parts is None:
            parts = p.derived[MaskParts] = MaskParts.of(p)
        return Call(p, blocks, parts, self._split(p), deterministic)

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        call = self.plan(p)
        with on_device(p.device):
            out, lse2 = call.forward(p.query, p.key, p.value, _detached(call.parts.bias))
        lse = natural_lse(lse2)
        if not p.inputs_finite:  # the kernels ran on zeroed copies
            out, lse = mark_visible_garbage(p, out, lse)
        return out, lse

    def backward(self, problem, out, lse, d_out, *, bias_grads=False):
        p = problem
        call = self.plan(p)
        bias = _detached(call.parts.bias)
        with on_device(p.device):
            dq, dk, dv, d_bias = call.backward(
                p.query, p.key, p.value, bias, out, kernel_lse(lse), d_out, bias_grads and bias is not None)
        leaves = [] if p.mask is None else p.mask.biases()
        if d_bias is None:
            return dq, dk, dv, tuple(None for _ in leaves)
        # The kernels read the mask's float part as one bias (Nm, Hm, R, C), the float leaves
        # added: each leaf's gradient is dS, summed over the dims it broadcasts along.
        return dq, dk, dv, tuple(heads_uncanonical(d_bias, p.batch_shape, leaf.tensor.shape) for leaf in leaves)


register(TritonEngine())
