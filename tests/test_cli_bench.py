"""dotattn bench: records, files, table, exponent fit and masks (never timings)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys

import pytest

from dotattn import masks
from dotattn.cli import bench, main

LENGTHS = [64, 128]


def _run(out_dir, *extra: str) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["bench", "--quick", "--lengths", ",".join(map(str, LENGTHS)), "--repeats", "1",
                   "--out", str(out_dir), *extra])
    return rc, stdout.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    rc, text = _run(out_dir, "--sweep")
    return rc, text, out_dir


def test_quick_run_writes_one_record_per_contender_and_length(quick):
    rc, _, out_dir = quick
    assert rc == 0
    with open(out_dir / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    pairs = [(r["engine"], int(r["L"])) for r in rows]
    contenders = {engine for engine, _ in pairs}
    assert {"torch", "tiled"} <= contenders
    assert sorted(pairs) == sorted((e, L) for e in contenders for L in LENGTHS)  # each exactly once
    assert all(float(r["ms"]) > 0 and float(r["gflops"]) > 0 for r in rows)
    assert all(float(r["peak_mib"]) >= 0 for r in rows)
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in rows if r["engine"] == "torch")
    with open(out_dir / "bench.json") as f:
        data = json.load(f)
    assert [(r["engine"], r["L"]) for r in data["records"]] == pairs
    assert all(r["ms"] > 0 for r in data["records"])
    assert data["meta"]["gemm_peak_gflops"]["float32"] > 0
    assert (out_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_terminal_table_lists_torch_and_tiled_and_says_where_files_are(quick):
    _, text, out_dir = quick
    rows = [line.split() for line in text.splitlines()]
    for engine in ["torch", "tiled"]:
        assert {int(row[1]) for row in rows if len(row) == 8 and row[2] == engine} == set(LENGTHS)
    assert "float32: GEMM peak" in text
    assert str(out_dir / "bench.csv") in text and str(out_dir / "bench.png") in text


def test_sweep_prints_a_fitted_exponent_per_engine(quick):
    _, text, out_dir = quick
    with open(out_dir / "bench.json") as f:
        data = json.load(f)
    contenders = {r["engine"] for r in data["records"]}
    printed = {line.split()[0]: float(line.split("p = ")[1]) for line in text.splitlines() if " p = " in line}
    assert set(printed) == contenders
    assert {e["engine"] for e in data["meta"]["exponents"]} == contenders
    assert "seeds' claim: p ≈ 2" in text


def test_fit_exponent_recovers_the_power():
    Ls = [256, 512, 1024, 4096]
    assert bench.fit_exponent(Ls, [3e-9 * L**2 for L in Ls]) == pytest.approx(2.0)
    assert bench.fit_exponent(Ls, [5e-6 * L for L in Ls]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two or more distinct lengths"):
        bench.fit_exponent([512, 512], [1.0, 2.0])


def test_window_gives_torch_a_dense_mask_and_engines_the_mask_algebra(tmp_path):
    rc, text = _run(tmp_path, "--window", "16", "--sweep")
    assert rc == 0
    with open(tmp_path / "bench.json") as f:
        records = json.load(f)["records"]
    expected = masks.causal() & masks.sliding_window(16)
    for r in records:
        L = r["L"]
        assert r["mask"] == str(expected)
        assert r["torch_mask"] == f"dense bool ({L}, {L})"
        assert r["allowed"] == pytest.approx(float(expected.to_dense(L, L).float().mean()))
        assert r["allowed"] < 0.3  # far below causal's ~0.5
    assert "seeds' claim: p ≈ 1" in text
    case = bench.make_case(64, window=16)
    assert case.torch_attn_mask.dtype.is_floating_point is False
    assert bool((case.torch_attn_mask == expected.to_dense(64, 64)).all())


def test_causal_goes_to_torch_as_is_causal():
    case = bench.make_case(100, causal=True)
    assert case.torch_is_causal and case.torch_attn_mask is None
    assert case.allowed == pytest.approx(float(masks.causal().to_dense(100, 100).float().mean()))


def test_backward_counts_three_and_a_half_forwards():
    records, _ = bench.measure_length("float32", 64, B=1, H=2, E=16, peak=100.0, backward=True,
                                      repeats=1, memory=False)
    for r in records:
        assert r.backward
        assert r.gflops * 1e9 * r.ms * 1e-3 == pytest.approx(4 * 2 * 64 * 64 * 16 * 3.5)
        assert r.pct_peak == pytest.approx(r.gflops)  # peak 100 GFLOP/s


def test_reference_is_skipped_above_the_memory_cap_and_says_why():
    records, skipped = bench.measure_length("float32", 64, B=1, H=2, E=16, peak=100.0,
                                            repeats=1, reference_gib=1e-9, memory=False)
    assert "reference" not in {r.engine for r in records}
    assert "--reference-gib" in skipped["reference"]
    assert {"torch", "tiled"} <= {r.engine for r in records}


def test_counter_on_stderr_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    progress = bench._progress(2)
    step = next(progress)
    step("a")
    step("b")
    next(progress, None)
    assert "[2/2] b" in capsys.readouterr().err


def test_benchmark_scripts_reuse_the_moved_helpers():
    import benchmarks.cpu

    assert benchmarks.cpu.timed is bench.timed and benchmarks.cpu.gemm_peak is bench.gemm_peak
    assert bench.timed([lambda: None, lambda: None], repeats=2)[0] >= 0
