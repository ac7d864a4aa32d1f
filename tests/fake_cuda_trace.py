"""Compiled dotattn calls on fake CUDA tensors, traced with no GPU (run by tests/test_triton_ops.py).

Run without TRITON_INTERPRET, so that Triton's jit functions are the real ones, with a
stand-in Triton driver that names an sm_90 target: torch analyses each launch's TTIR (what it
writes) for that target. Each case compiles with ``fullgraph=True`` and a backend that keeps
the graphs AOTAutograd would hand Inductor; prints one line, ``REPORT <json>``: per case the
launches (kernel, tensors it writes) and dotattn operators in each graph, and the output's
shape and dtype; then ``torch.export`` of a module, whose graph keeps the operator as a call.
"""

from __future__ import annotations

import json

import torch

import dotattn
from dotattn import masks
from dotattn.engines.split_k import traced_spans


def launches(gm) -> list:
    """[kernel name, the tensors Triton found it writes] per launch, and the dotattn operators
    left in ``gm``."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            found.append([kernel.fn.__name__, sorted(node.kwargs["tensors_to_clone"])])
        elif str(node.target).startswith("dotattn."):
            found.append([str(node.target), None])
    return found


def main() -> None:
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget

    class Sm90:  # what Triton asks its driver while torch analyses a launch
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(Sm90())
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    bf16 = torch.bfloat16
    cases = {
        "causal": (dict(is_causal=True), 512, 512, 8, 8),
        "no mask, float32": (dict(), 256, 256, 8, 8),
        "window": (dict(mask=masks.causal() & masks.sliding_window(128)), 1024, 1024, 8, 2),
        "padding": (dict(mask="padding"), 384, 384, 8, 8),  # lengths a tensor
        "bottom-right, softcap": (dict(mask=masks.causal(align="bottom_right"), softcap=30.0), 128, 640, 8, 8),
        "dropout": (dict(dropout_p=0.1), 256, 256, 8, 8),
        "dense mask": (dict(attn_mask="dense"), 256, 256, 8, 8),
        "decoding step": (dict(is_causal=False), 1, 2048, 8, 8),
        "reference engine": (dict(engine="reference"), 256, 256, 8, 8),
    }
    report = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, (kwargs, Lq, Lk, Hq, Hkv) in cases.items():
            torch._dynamo.reset()
            graphs.clear()
            dtype = torch.float32 if "float32" in name else bf16
            q = torch.empty(2, Hq, Lq, 64, device="cuda", dtype=dtype)
            k, v = (torch.empty(2, Hkv, Lk, 64, device="cuda", dtype=dtype) for _ in range(2))
            kwargs = dict(kwargs, enable_gqa=Hq != Hkv)
            lengths = torch.empty(2, device="cuda", dtype=torch.int64)  # built into a mask while tracing
            padded = kwargs.pop("mask", None) == "padding"
            if kwargs.get("attn_mask") == "dense":
                kwargs["attn_mask"] = torch.empty(Lq, Lk, device="cuda", dtype=torch.bool)

            def call(q, k, v, lengths, kw=kwargs, padded=padded):
                mask = masks.padding(lengths) if padded else kw.get("mask")
                return dotattn.scaled_dot_product_attention(q, k, v, **dict(kw, mask=mask))

            out = torch.compile(call, backend=backend, fullgraph=True)(q, k, v, lengths)
            report[name] = dict(graphs=[launches(g) for g in graphs], shape=list(out.shape), dtype=str(out.dtype))
        torch._dynamo.reset()
        graphs.clear()
        f = torch.compile(lambda q: dotattn.scaled_dot_product_attention(q, q, q, is_causal=True), backend=backend,
                          fullgraph=True, dynamic=True)
        for L in (256, 512, 1024, 4096):  # one key tile (L <= 128) specializes: a second graph
            f(torch.empty(1, 4, L, 64, device="cuda", dtype=bf16))
        report["dynamic lengths"] = dict(graphs=[launches(g) for g in graphs])
        graphs.clear()
        q = torch.empty(2, 8, 512, 128, device="cuda", dtype=bf16)
        k = torch.empty(2, 2, 512, 128, device="cuda", dtype=bf16)
        lo, hi = traced_spans(masks.causal(), 512, 512, (2, 8, 512), flag_oversized=False)
        out, lse = torch.ops.dotattn.triton_attention(q, k, k, lo, hi, 0.1, 0.0)
        backward = aot_function(lambda *a: torch.ops.dotattn.triton_attention_backward(*a, lo, hi, 0.1, 0.0),
                                fw_compiler=keep)
        grads = backward(torch.empty_like(out), q, k, k, out, lse)
        report["backward"] = dict(graphs=[launches(g) for g in graphs], shapes=[list(g.shape) for g in grads])

        class Causal(torch.nn.Module):
            def forward(self, q, k, v):
                return dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        exported = torch.export.export(Causal(), (q, k, k))
        report["export"] = dict(graphs=[launches(exported.graph_module)])
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
