"""Ring attention on W gloo processes of this machine against the single-process tiled engine.

    python -m benchmarks.ring            # from the repository root; about two minutes
    python -m benchmarks.ring --quick    # one small size
    python -m benchmarks.ring --memory   # peak memory per rank, W 1 (single process), 2, 4

Each process gets one thread (torch.set_num_threads(1)), as does the single-process run,
so the ratio "ring time / single time" would be 1/W with perfect scaling and free
communication. This machine has 2 cores, shared with other work: with W = 4 four
processes share 2 cores, so its times measure overhead, not speedup. Indicative only.

The model. Per forward step a rank sends one K/V shard and receives another, each

    bytes/step = B·Hkv·S·(E+Ev)·itemsize        (S = L/W)

while it computes at most FLOPs/step = 2·B·Hq·S²·(E+Ev) (= 4·B·Hq·S²·E for Ev = E). At a
compute rate R (FLOP/s) and a link bandwidth BW (bytes/s) the transfer hides when

    T_comm / T_compute = (Hkv/Hq) · itemsize · R / (2 · S · BW) < 1,
    i.e.  S > S* = (Hkv/Hq) · itemsize · R / (2 · BW)          (independent of E).

Besides the whole ring, the script times one step's parts alone (one whole block's
compute, giving R; one K/V transfer, giving BW) and prints S* next to the S it ran.

--memory measures what the method is for: each rank's peak bytes (the torch profiler's
allocations, ``dotattn.benchmarking.peak_bytes``) during one causal zigzag forward+backward,
its inputs, d_out and the gradients' first allocation excluded by a warm-up call, against
the single-process tiled engine on the whole sequence. Per rank it should fall as 1/W.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dotattn
from dotattn.benchmarking import peak_bytes
from dotattn.distributed import ring as ring_module
from dotattn.distributed import ring_attention, shard_sequence

B, H, E = 1, 8, 64
DTYPE = torch.float32


def _inputs(L: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, E, generator=g, dtype=DTYPE).requires_grad_(requires_grad) for _ in range(3))


def _median_max(fn, repeats: int, group_timed: bool) -> float:
    """Median over repeats of the slowest rank's seconds (barrier before each run)."""
    fn()
    times = []
    for _ in range(repeats):
        if group_timed:
            dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        if group_timed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for L in sizes:
        for causal, layout in [(False, "contiguous"), (True, "contiguous"), (True, "zigzag")]:
            q, k, v = (shard_sequence(x, rank=rank, world=world, layout=layout).detach().clone().requires_grad_()
                       for x in _inputs(L, False))

            def forward():
                with torch.no_grad():
                    ring_attention(q, k, v, is_causal=causal, layout=layout)

            def both():
                ring_attention(q, k, v, is_causal=causal, layout=layout).sum().backward()

            t_fwd = _median_max(forward, repeats, True)
            t_both = _median_max(both, repeats, True)
            # One step's parts alone: the compute of a whole (unmasked) block, one K/V transfer.
            block = ring_module.prepare(q.detach(), k.detach(), v.detach())
            tiled = dotattn.engines.get("tiled")
            t_block = _median_max(lambda: tiled.forward(block), repeats, False)
            plan = ring_module._Ring(None, rank, world, layout, L, L, None, E**-0.5, False, (B,), tiled, False)
            t_comm = _median_max(lambda: ring_module._Transfer(plan, (k.detach(), v.detach()), 1).wait(),
                                 repeats, True)
            # The same transfer started before a block's compute, as the ring does: the wait after it.
            exposed = []
            for _ in range(repeats):
                dist.barrier()
                transfer = ring_module._Transfer(plan, (k.detach(), v.detach()), 1)
                tiled.forward(block)
                start = time.perf_counter()
                transfer.wait()
                exposed.append(time.perf_counter() - start)
            t_exposed = statistics.median(exposed)
            if rank == 0:
                results.put(dict(world=world, L=L, causal=causal, layout=layout, t_fwd=t_fwd, t_both=t_both,
                                 t_block=t_block, t_comm=t_comm, t_exposed=t_exposed,
                                 step_bytes=(k.numel() + v.numel()) * k.element_size()))
    dist.destroy_process_group()


def _step(q, k, v, d_out, world: int) -> None:
    """One causal forward+backward, on the ring (zigzag) or, with world 1, the tiled engine."""
    for x in (q, k, v):
        x.grad = None
    if world == 1:
        out = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, engine="tiled")
    else:
        out = ring_attention(q, k, v, is_causal=True, layout="zigzag")
    out.backward(d_out)


def rank_peak(rank: int, world: int, L: int) -> tuple[int, int]:
    """This rank's peak bytes during one causal zigzag forward+backward (after a warm-up call:
    gloo's buffers, the gradients' first allocation), and the bytes of one shard (B, H, L/W, E).
    Every rank of the default group calls it; tests/test_distributed.py bounds the ratio."""
    q, k, v, d_out = (shard_sequence(x, rank=rank, world=world, layout="zigzag").detach().clone()
                      for x in (*_inputs(L, False), _inputs(L, False)[0]))
    for x in (q, k, v):
        x.requires_grad_()
    _step(q, k, v, d_out, world)
    dist.barrier()
    return peak_bytes(lambda: _step(q, k, v, d_out, world)), q.numel() * q.element_size()


def _memory_worker(rank: int, world: int, port: int, L: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results.put((rank, rank_peak(rank, world, L)[0]))
    dist.destroy_process_group()


def memory(L: int) -> None:
    """Peak bytes per rank for W 1, 2, 4 (see the module docstring)."""
    torch.set_num_threads(1)
    q, k, v = _inputs(L, True)
    d_out = _inputs(L, False)[0]
    _step(q, k, v, d_out, 1)
    single = peak_bytes(lambda: _step(q, k, v, d_out, 1))
    tensor = q.numel() * q.element_size()
    print(f"torch {torch.__version__}, float32, B={B}, H={H}, L={L}, E=Ev={E}, causal, forward+backward; "
          f"one (B, H, L, E) tensor = {tensor / 2**20:.0f} MiB")
    print(f"{'W':>2} {'layout':>10} {'peak MiB/rank':>13} {'x single':>8} {'x 1/W':>6} {'in tensors':>10}")
    print(f"{1:>2} {'single':>10} {single / 2**20:13.1f} {1:8.2f} {1:6.2f} {single / tensor:10.2f}")
    for world in (2, 4):
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_memory_worker, args=(r, world, port, L, results)) for r in range(world)]
        for p in procs:
            p.start()
        peaks = dict(results.get(timeout=600) for _ in range(world))
        for p in procs:
            p.join()
        worst = max(peaks.values())
        print(f"{world:>2} {'zigzag':>10} {worst / 2**20:13.1f} {worst / single:8.2f} "
              f"{worst / single * world:6.2f} {worst / tensor:10.2f}")
    print("\npeak MiB/rank: the largest rank's peak of torch allocations during the call; x 1/W: that over")
    print("single/W (1.00 = memory falls exactly as 1/W); in tensors: in units of one whole (B, H, L, E) tensor.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ring_results(world: int, sizes: list[int], repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, sizes, repeats, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in range(3 * len(sizes))]
    for p in procs:
        p.join()
    return out


def _single(L: int, causal: bool, repeats: int) -> tuple[float, float]:
    q, k, v = _inputs(L, True)

    def forward():
        with torch.no_grad():
            dotattn.scaled_dot_product_attention(q, k, v, is_causal=causal, engine="tiled")

    def both():
        dotattn.scaled_dot_product_attention(q, k, v, is_causal=causal, engine="tiled").sum().backward()

    return _median_max(forward, repeats, False), _median_max(both, repeats, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats")
    parser.add_argument("--memory", type=int, nargs="?", const=8192, metavar="L",
                        help="peak memory per rank instead of time (L default 8192)")
    args = parser.parse_args()
    if args.memory:
        return memory(args.memory)
    sizes, repeats = ([1024], 3) if args.quick else ([2048, 4096], 3)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, float32, B={B}, H={H}, E=Ev={E}; one thread per process; "
          f"{torch.get_num_interop_threads()} interop threads; this machine: 2 cores, shared")
    single = {(L, c): _single(L, c, repeats) for L in sizes for c in (False, True)}
    rows = []
    for world in (2, 4):
        rows += _ring_results(world, sizes, repeats)
    print(f"\n{'W':>2} {'L':>5} {'mask':>7} {'layout':>10} {'single fwd':>10} {'ring fwd':>9} {'ratio':>6} "
          f"{'single f+b':>10} {'ring f+b':>9} {'ratio':>6} {'KiB/step':>9} {'block ms':>9} {'send ms':>8} "
          f"{'left ms':>8} {'GFLOP/s':>8} {'GB/s':>6} {'S':>5} {'S*':>5} {'model fwd':>9}")
    for r in rows:
        L, world = r["L"], r["world"]
        s_fwd, s_both = single[(L, r["causal"])]
        S = L // world
        rate = 4 * B * H * S * S * E / r["t_block"]  # a whole block's FLOPs per second
        bandwidth = r["step_bytes"] / r["t_comm"]
        s_star = DTYPE.itemsize * rate / (2 * bandwidth)  # Hkv = Hq here
        print(f"{world:>2} {L:>5} {'causal' if r['causal'] else 'none':>7} {r['layout']:>10} "
              f"{s_fwd * 1e3:10.1f} {r['t_fwd'] * 1e3:9.1f} {r['t_fwd'] / s_fwd:6.2f} "
              f"{s_both * 1e3:10.1f} {r['t_both'] * 1e3:9.1f} {r['t_both'] / s_both:6.2f} "
              f"{r['step_bytes'] / 1024:9.0f} {r['t_block'] * 1e3:9.1f} {r['t_comm'] * 1e3:8.2f} "
              f"{r['t_exposed'] * 1e3:8.2f} "
              f"{rate / 1e9:8.1f} {bandwidth / 1e9:6.2f} {S:>5} {s_star:5.0f} {_model(r) * 1e3:9.1f}")
    print("\nratio = ring / single-process time (1/W would be perfect scaling on W free cores).")
    print("block ms: one whole S x S block alone; send ms: one K/V shard round the ring alone;")
    print("left ms: the wait for that transfer when it was started before a block's compute (0 = hidden).")
    print("S* = (Hkv/Hq)·itemsize·R/(2·BW) from the measured R (GFLOP/s) and BW (GB/s): the transfer")
    print("hides behind the block's compute when S > S*. model fwd: the slowest rank's steps, each")
    print("max(its block's compute, one transfer), from block ms and send ms (overhead and merges left out).")


def _model(r: dict) -> float:
    """The ring forward's time by the model: the busiest rank's steps, max(compute, transfer) each."""
    world, block, comm = r["world"], r["t_block"], r["t_comm"]
    if not r["causal"]:
        return world * max(block, comm)
    if r["layout"] == "zigzag":  # every step computes half a block's scores
        return world * max(block / 2, comm)
    # contiguous: the last rank computes W-1 whole blocks and the half-empty diagonal one
    return (world - 1) * max(block, comm) + max(block / 2, comm)


if __name__ == "__main__":
    main()
