"""The kernels' block sizes: configs filtered by what fits, timed once per problem class.

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages). On the GPU each kernel takes the
fastest config that fits shared memory, timed on the first call of each problem class;
in Triton's interpreter, which pays per tile in Python, the blocks are fixed and large.
"""

from __future__ import annotations

# The interpreter's tile sizes: large, since it pays per tile in Python (test_triton.py sets small
# ones to cover many full, partial and empty tiles).
INTERPRETER_BLOCKS = (128, 128)

FWD_CONFIGS = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)]
# dk/dv: keys along the rows (BLOCK_N) stay resident, queries stream (BLOCK_M)
DKDV_CONFIGS = [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 2)]
DQ_CONFIGS = [(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
SHARED_MEMORY = 200 * 1024  # bytes a block may use, with margin below an H100's 227 KiB
# Split-K decoding (one config, not tuned: no GPU has timed it yet): at most 64 rows per
# program, keys in tiles of at most 64 whose K and V take 64 KiB per pipeline stage.
DECODE_ROWS, DECODE_STAGE_BYTES, DECODE_WARPS, DECODE_STAGES = 64, 64 * 1024, 4, 3


def decode_rows(R: int) -> int:
    """Query rows per split-K decoding program, for a kv head's R = G·Lq rows: all of them,
    up to DECODE_ROWS (padded to a power of two, at least 16 for the MMA)."""
    return min(DECODE_ROWS, pow2(R))


def fits(config: tuple[int, int, int, int], BE: int, BEV: int, itemsize: int, resident: str) -> bool:
    """Whether a config's tiles fit shared memory: the resident block once, the streamed
    tiles once per pipeline stage."""
    bm, bn, _, stages = config
    rows_resident, rows_streamed = (bm, bn) if resident == "m" else (bn, bm)
    need = rows_resident * (BE + BEV) * itemsize + stages * rows_streamed * (BE + BEV) * itemsize
    return need <= SHARED_MEMORY and bm * max(BE, BEV) <= 128 * 256 and bn * max(BE, BEV) <= 128 * 256


def pow2(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


_TUNED: dict[tuple, tuple[int, int, int, int]] = {}


def tuned_config(key: tuple, configs: list, launch) -> tuple[int, int, int, int]:
    """The fastest of ``configs`` for ``launch``, timed on the first call of each key. Every
    launch writes the same outputs (one that accumulates clears its buffer first), so timing
    them is harmless."""
    found = _TUNED.get(key)
    if found is None:
        from triton.testing import do_bench

        timings = {}
        for config in configs:
            try:
                timings[config] = do_bench(lambda: launch(config), warmup=5, rep=20)
            except Exception:  # a config the compiler rejects (resources): not a candidate
                continue
        if not timings:
            raise RuntimeError(f"triton engine: no kernel config compiled for {key}; configs tried: {configs}")
        found = _TUNED[key] = min(timings, key=timings.get)
    return found
