"""dotattn.distributed: ring attention on 2 and 4 gloo processes against the single-process function.

Spawning a process group costs seconds, so each world size starts one group whose workers
run every case in turn and report their errors through a queue; the tests then read them.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from functools import cache

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import benchmarks.ring
import dotattn
import tests.chunked_engine  # noqa: F401  registers the test-only "chunked" engine, in the workers too
from dotattn import masks as M
from dotattn.distributed import gather_sequence, ring, ring_attention, shard_ranges, shard_sequence
from dotattn.engines.triton import MISSING as TRITON_MISSING

TOL = 1e-9  # float64, max abs error of output and every gradient
LAYOUTS = ("contiguous", "zigzag")
E, EV = 17, 11


def _inputs(case: str, world: int, seed: int = 0, bias_dtype: torch.dtype = torch.float64) -> dict:
    """The whole problem of a case, the same on every rank: q, k, v, the cotangent and kwargs
    (whose float biases are fresh leaves in ``bias_dtype`` that require grad)."""
    L = 24 * world  # divides by 2·world: zigzag chunks of 12 positions, contiguous shards of 24
    Lq, B, Hq, Hkv = L, 2, 2, 2
    kwargs: dict = {}
    g = torch.Generator().manual_seed(seed)
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "window":
        kwargs["mask"] = M.sliding_window(7, 3)
    elif case == "documents":
        lengths = [[5, 17, 1, L - 23], [L // 2, L - L // 2]]
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths])
        kwargs["mask"] = M.documents(ids) & M.causal()
    elif case == "padding":  # right padding, padded query rows see nothing
        kwargs["mask"] = M.padding([L - 5, L // 3], q_lengths=[L - 3, L // 3])
        kwargs["is_causal"] = True
    elif case == "left_padding":
        kwargs["mask"] = M.padding([L - 7, 9], q_lengths=[L - 7, 9], side="left") & M.causal()
    elif case == "gqa":
        Hq, Hkv = 4, 2
        kwargs.update(enable_gqa=True, is_causal=True)
    elif case == "mqa_prefix":
        Hq, Hkv = 3, 1
        kwargs.update(enable_gqa=True, mask=M.prefix_lm(L // 3))
    elif case == "cross_bottom_right":  # Lq = L/2 queries against L keys, the decoding alignment
        Lq = L // 2
        kwargs["mask"] = M.causal(align="bottom_right")
    elif case == "dense_bool":
        kwargs["attn_mask"] = torch.rand(L, L, generator=g) < 0.6
    elif case == "dense_float":  # a trained bias: its gradient is compared too
        kwargs["attn_mask"] = torch.randn(Hq, L, L, generator=g, dtype=torch.float64).to(bias_dtype).requires_grad_()
    elif case == "key_bias_causal":  # a per-key bias that broadcasts over heads and queries
        bias = torch.randn(B, 1, 1, L, generator=g, dtype=torch.float64).to(bias_dtype).requires_grad_()
        kwargs["mask"] = M.dense(bias) & M.causal()
    elif case != "full":
        raise ValueError(case)
    q = torch.randn(B, Hq, Lq, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, EV, generator=g, dtype=torch.float64)
    d_out = torch.randn(B, Hq, Lq, EV, generator=g, dtype=torch.float64)
    return dict(q=q, k=k, v=v, d_out=d_out, kwargs=kwargs)


CASES = ["full", "causal", "window", "documents", "padding", "left_padding", "gqa", "mqa_prefix",
         "cross_bottom_right", "dense_bool", "dense_float", "key_bias_causal"]


def _backward(out: torch.Tensor, d_out: torch.Tensor) -> None:
    """out.backward(d_out), through a scalar: a tensor gradient makes torch import sympy, seconds per process."""
    (out * d_out).sum().backward()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _biases(kwargs: dict) -> list[torch.Tensor]:
    """The float tensors of a case's masks (attn_mask, dense leaves of mask)."""
    leaves = [] if kwargs.get("mask") is None else [leaf.tensor for leaf in kwargs["mask"].biases()]
    attn_mask = kwargs.get("attn_mask")
    return leaves + ([attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else [])


def _run_case(case: str, layout: str, rank: int, world: int, group: dist.ProcessGroup | None = None) -> dict:
    """This rank's max errors (output, dq, dk, dv, and each float bias's gradient summed over
    the ranks) against the single-process function, and how many blocks its forward
    computed. rank and world are this process's in ``group``."""
    x = _inputs(case, world)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    expected = dotattn.scaled_dot_product_attention(q, k, v, **x["kwargs"])
    _backward(expected, x["d_out"])
    kwargs = _inputs(case, world)["kwargs"]  # the same values, in fresh leaves for the ring's gradients

    shard = dict(rank=rank, world=world, layout=layout)
    # Contiguous shards are views along L of the whole tensors: non-contiguous inputs.
    qs, ks, vs = (shard_sequence(x[n], **shard).requires_grad_() for n in "qkv")
    assert layout == "zigzag" or world == 1 or not qs.is_contiguous()
    calls = []
    blocks = dotattn.engines.get("tiled")  # what auto picks for these CPU blocks

    def counting(problem):
        calls.append(problem.Lq * problem.Lk)
        return type(blocks).forward(blocks, problem)

    blocks.forward = counting  # this instance's forward only
    try:
        out = ring_attention(qs, ks, vs, group=group, layout=layout, **kwargs)
    finally:
        del blocks.forward
    _backward(out, shard_sequence(x["d_out"], **shard))
    whole = gather_sequence(out.detach(), group=group, layout=layout)
    errors = {
        "out": _max_err(out, shard_sequence(expected.detach(), **shard)),
        "gathered": _max_err(whole, expected.detach()),
        "dq": _max_err(qs.grad, shard_sequence(q.grad, **shard)),
        "dk": _max_err(ks.grad, shard_sequence(k.grad, **shard)),
        "dv": _max_err(vs.grad, shard_sequence(v.grad, **shard)),
    }
    for i, (mine, single) in enumerate(zip(_biases(kwargs), _biases(x["kwargs"]), strict=True)):
        dist.all_reduce(mine.grad, group=group)  # each rank holds its query rows' share
        errors[f"dbias{i}"] = _max_err(mine.grad, single.grad)
    finite = all(bool(torch.isfinite(t).all()) for t in (out, qs.grad, ks.grad, vs.grad))
    return dict(errors=errors, finite=finite, blocks=len(calls), block_scores=sum(calls))


LOW_PRECISION = (torch.float32, torch.bfloat16)


def _run_low_precision(dtype: torch.dtype, layout: str, rank: int, world: int) -> dict:
    """Causal attention in ``dtype``: (ring error, single-process tiled error) against the float64
    oracle, for the output and each gradient of this rank's shard."""
    x = _inputs("causal", world)
    shard = dict(rank=rank, world=world, layout=layout)
    grads = {}
    for name, dt in (("oracle", torch.float64), ("single", dtype)):
        q, k, v = (x[n].to(dt, copy=True).requires_grad_() for n in "qkv")
        engine = "reference" if dt == torch.float64 else "tiled"
        out = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, engine=engine)
        _backward(out, x["d_out"].to(dt))
        grads[name] = [shard_sequence(t.detach().double(), **shard) for t in (out, q.grad, k.grad, v.grad)]
    qs, ks, vs = (shard_sequence(x[n], **shard).to(dtype).requires_grad_() for n in "qkv")
    out = ring_attention(qs, ks, vs, is_causal=True, layout=layout)
    _backward(out, shard_sequence(x["d_out"], **shard).to(dtype))
    grads["ring"] = [t.detach().double() for t in (out, qs.grad, ks.grad, vs.grad)]
    return {
        name: (_max_err(grads["ring"][i], grads["oracle"][i]), _max_err(grads["single"][i], grads["oracle"][i]))
        for i, name in enumerate(("out", "dq", "dk", "dv"))
    }


# Engines the ring runs besides auto's choice: triton (the GPU path, in Triton's interpreter) and
# the test-only engine written against the engine contract alone.
ENGINES = ["chunked"] + (["triton"] if TRITON_MISSING is None else [])
TRITON_CASES = [("causal", "zigzag"), ("documents", "contiguous"), ("gqa", "zigzag"), ("padding", "contiguous"),
                ("dense_bool", "zigzag"), ("dense_float", "zigzag"), ("key_bias_causal", "contiguous")]


def _run_on_engine(engine: str, case: str, layout: str, rank: int, world: int) -> dict:
    """The ring with its blocks on ``engine`` (float32; triton in Triton's interpreter): {name:
    (ring error, single-process error of the engine)} against the float64 function, for the
    output and each gradient of this rank's shard (a float bias's: summed over the ranks, whole)."""
    x = _inputs(case, world)
    shard = dict(rank=rank, world=world, layout=layout)
    grads = {}
    for name, dt in (("oracle", torch.float64), ("single", torch.float32)):
        q, k, v = (x[n].to(dt, copy=True).requires_grad_() for n in "qkv")
        kwargs = _inputs(case, world, bias_dtype=dt)["kwargs"]
        out = dotattn.scaled_dot_product_attention(q, k, v, engine="reference" if name == "oracle" else engine,
                                                   **kwargs)
        _backward(out, x["d_out"].to(dt))
        grads[name] = [shard_sequence(t.detach().double(), **shard) for t in (out, q.grad, k.grad, v.grad)]
        grads[name] += [b.grad.double() for b in _biases(kwargs)]
    qs, ks, vs = (shard_sequence(x[n], **shard).float().requires_grad_() for n in "qkv")
    kwargs = _inputs(case, world, bias_dtype=torch.float32)["kwargs"]
    out = ring_attention(qs, ks, vs, layout=layout, engine=engine, **kwargs)
    _backward(out, shard_sequence(x["d_out"], **shard).float())
    grads["ring"] = [t.detach().double() for t in (out, qs.grad, ks.grad, vs.grad)]
    for b in _biases(kwargs):
        dist.all_reduce(b.grad)  # each rank holds its query rows' share
        grads["ring"].append(b.grad.double())
    names = ["out", "dq", "dk", "dv"] + [f"dbias{i}" for i in range(len(grads["ring"]) - 4)]
    return {
        name: (_max_err(grads["ring"][i], grads["oracle"][i]), _max_err(grads["single"][i], grads["oracle"][i]))
        for i, name in enumerate(names)
    }


def _error_cases(rank: int, world: int) -> dict:
    """The message each bad call raises on this rank (every rank must raise, or the ring hangs)."""
    out = {}
    x = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    bad = {
        "mismatch": lambda: ring_attention(x[..., : 6 - (rank == 0), :], x, x),
        "causal_mismatch": lambda: ring_attention(x, x, x, is_causal=rank == 0),
        "zigzag_odd": lambda: ring_attention(x[..., :5, :], x[..., :5, :], x[..., :5, :], layout="zigzag"),
        "layout": lambda: ring_attention(x, x, x, layout="striped"),
        "float16": lambda: ring_attention(x.half(), x.half(), x.half()),
        "local_mask": lambda: ring_attention(x, x, x, mask=M.documents(torch.zeros(6, dtype=torch.long))),
        "engine": lambda: ring_attention(x, x, x, engine="flash"),
    }
    for name, call in bad.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def _peak_shards(rank: int, world: int) -> float:
    """This rank's peak of torch allocations during one causal zigzag forward+backward, in
    shard-sized tensors (B, H, L/W, E): B 1, H 8, L 2048, E 64, float32."""
    peak, shard = benchmarks.ring.rank_peak(rank, world, 2048)
    return peak / shard


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels take CPU tensors
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    key = None
    try:
        for key in [(case, layout) for case in CASES for layout in LAYOUTS]:
            results.put((rank, key, _run_case(*key, rank, world)))
        for dtype in LOW_PRECISION:
            for layout in LAYOUTS:
                key = ("low_precision", dtype, layout)
                results.put((rank, key, _run_low_precision(dtype, layout, rank, world)))
        for engine in ENGINES:
            for case, layout in TRITON_CASES:
                key = (engine, case, layout)
                results.put((rank, key, _run_on_engine(engine, case, layout, rank, world)))
        key = "errors"
        results.put((rank, key, _error_cases(rank, world)))
        key = "memory"
        results.put((rank, key, _peak_shards(rank, world)))
        # A group that is not the default one, whose ranks are not the global ones: global
        # ranks 1 and 3 of 4, or rank 1 alone (a ring of one) of 2.
        key = "subgroup"
        members = [1, 3] if world == 4 else [1]
        group = dist.new_group(members)
        result = None
        if rank in members:
            result = _run_case("causal", "zigzag", members.index(rank), len(members), group)
        results.put((rank, key, result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        # A rank that fails leaves the ring: report it and leave, and the others fail too.
        results.put((rank, key, traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@cache
def _results(world: int) -> dict:
    """{key: [per-rank result]} from one spawned group of ``world`` gloo processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    expected = world * ((len(CASES) + len(LOW_PRECISION)) * len(LAYOUTS) + len(ENGINES) * len(TRITON_CASES) + 3)
    out: dict = {}
    try:
        for _ in range(expected):
            try:
                rank, key, value = results.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"the {world}-process group stopped reporting; got {sorted(map(str, out))}")
            out.setdefault(key, [None] * world)[rank] = value
            if isinstance(value, str):  # a traceback: the group is going down
                pytest.fail(f"rank {rank} of {world} failed in case {key}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


WORLDS = (2, 4)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_ring_matches_single_process(case, layout, world):
    per_rank = _results(world)[(case, layout)]
    for rank, result in enumerate(per_rank):
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
        assert result["finite"], f"rank {rank}: NaN or inf in the output or a gradient"
        worst = {name: err for name, err in result["errors"].items() if not err <= TOL}
        assert not worst, f"rank {rank}: errors above {TOL}: {worst}"
        assert ("dbias0" in result["errors"]) == (case in ("dense_float", "key_bias_causal"))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).removeprefix("torch."))
def test_ring_in_low_precision_is_as_accurate_as_the_tiled_engine(dtype, layout, world):
    """The 2x rule against the float64 oracle, with the single-process tiled engine as the yardstick."""
    eps = {torch.float32: 1e-6, torch.bfloat16: 1e-3}[dtype]
    for rank, result in enumerate(_results(world)[("low_precision", dtype, layout)]):
        for name, (ring_err, single_err) in result.items():
            assert ring_err <= 2 * single_err + eps, f"rank {rank} {name}: ring {ring_err:.2e}, tiled {single_err:.2e}"


@pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING))
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case,layout", TRITON_CASES, ids=[f"{c}-{lay}" for c, lay in TRITON_CASES])
def test_ring_on_the_triton_engine_is_as_accurate_as_the_engine(case, layout, world):
    """The GPU path (blocks on the triton engine, as for CUDA tensors over NCCL), run in
    Triton's interpreter: the 2x rule against the float64 function, with the single-process
    triton engine as the yardstick."""
    for rank, result in enumerate(_results(world)[("triton", case, layout)]):
        assert ("dbias0" in result) == (case in ("dense_float", "key_bias_causal"))
        for name, (ring_err, single_err) in result.items():
            assert ring_err <= 2 * single_err + 1e-6, f"rank {rank} {name}: ring {ring_err:.2e}, triton {single_err:.2e}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case,layout", TRITON_CASES, ids=[f"{c}-{lay}" for c, lay in TRITON_CASES])
def test_ring_on_an_engine_registered_by_a_test_is_as_accurate_as_the_engine(case, layout, world):
    """A new engine runs in the ring with no edit there: the test-only "chunked" engine, the 2x
    rule against the float64 function with the single-process engine as the yardstick."""
    for rank, result in enumerate(_results(world)[("chunked", case, layout)]):
        assert ("dbias0" in result) == (case in ("dense_float", "key_bias_causal"))
        for name, (ring_err, single_err) in result.items():
            assert ring_err <= 2 * single_err + 1e-6, f"rank {rank} {name}: ring {ring_err:.2e}, chunked {single_err:.2e}"


@pytest.mark.parametrize("world", WORLDS)
def test_ring_on_a_subgroup(world):
    members = [1, 3] if world == 4 else [1]
    for rank, result in enumerate(_results(world)["subgroup"]):
        if rank not in members:
            assert result is None
            continue
        assert isinstance(result, dict) and result["finite"]
        assert max(result["errors"].values()) <= TOL, result["errors"]
        assert result["blocks"] == len(members)


@pytest.mark.parametrize("world", WORLDS)
def test_empty_shard_pairs_are_not_computed(world):
    results = _results(world)
    S = 24  # the shard length of _inputs
    # Causal, contiguous: rank r sees the shards of ranks 0..r only.
    assert [r["blocks"] for r in results[("causal", "contiguous")]] == [r + 1 for r in range(world)]
    # Zigzag: every rank meets every other rank's shard, but each chunk pair that causality
    # empties is left out, so every rank computes the same number of scores.
    zigzag = [r["block_scores"] for r in results[("causal", "zigzag")]]
    assert len(set(zigzag)) == 1
    assert zigzag[0] == S * S + (world - 1) * S * S // 2  # the diagonal whole, the rest halves
    assert [r["blocks"] for r in results[("full", "contiguous")]] == [world] * world
    # A window of 7 back and 3 ahead reaches only the neighbouring shards.
    assert [r["blocks"] for r in results[("window", "contiguous")]] == [2] + [3] * (world - 2) + [2]


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_holds_a_few_shards_not_the_sequence(world):
    """Context parallelism is there for memory: a rank's peak during a causal forward+backward
    is a constant number of shard-sized tensors, whatever W (its K/V and the next, a dK/dV
    partial leaving and one arriving, a block's gradients, dq and the output: 11.5 at W 2 and
    13.5 at W 4 when this was written; benchmarks/ring.py --memory), never the whole sequence."""
    peaks = _results(world)["memory"]
    assert max(peaks) <= 14.5, peaks


@pytest.mark.parametrize("world", WORLDS)
def test_bad_calls_raise_on_every_rank(world):
    per_rank = _results(world)["errors"]
    for messages in per_rank:
        assert "ring_attention: the arguments (shapes of query, key, value;" in messages["mismatch"]
        assert "differ across ranks (rank 0: (((1, 2, 5, 4)" in messages["mismatch"]
        assert "is_causal" in messages["causal_mismatch"] and "differ across ranks" in messages["causal_mismatch"]
        assert "shards are 5 (query) and 5 (key) long" in messages["zigzag_odd"]
        assert "'striped'" in messages["layout"]
        assert "tiled engine, which cannot run this: dtype float16" in messages["float16"]
        assert "q_doc_ids has length 6 but Lq is" in messages["local_mask"]
        assert "describe every position, not this rank's shard" in messages["local_mask"]
        assert "'flash'" in messages["engine"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_sequence_partitions_the_sequence(layout):
    x = torch.arange(48).reshape(1, 48, 1)
    shards = [shard_sequence(x, dim=1, rank=r, world=4, layout=layout) for r in range(4)]
    assert sorted(torch.cat(shards, 1).flatten().tolist()) == list(range(48))
    for r, s in enumerate(shards):
        expected = [i for rng in shard_ranges(48, rank=r, world=4, layout=layout) for i in rng]
        assert s.flatten().tolist() == expected
    assert shard_ranges(48, rank=1, world=4, layout="zigzag") == [range(6, 12), range(36, 42)]


def test_shard_sequence_errors_name_the_fix():
    x = torch.zeros(2, 3, 30, 8)
    with pytest.raises(ValueError, match=r"length 30.*multiple of 4 .*pad the sequence to 32"):
        shard_sequence(x, rank=0, world=4)
    with pytest.raises(ValueError, match=r"multiple of 8 \(2 x the world size\).*pad the sequence to 32"):
        shard_sequence(x[..., :28, :], rank=0, world=4, layout="zigzag")
    with pytest.raises(ValueError, match="layout must be"):
        shard_sequence(x, rank=0, world=2, layout="striped")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ring_attention(x, x, x)
