"""The compiled kernel's instruction-set levels: built for each, the best this CPU runs is
loaded, DOTATTN_CPU_LEVEL forces a lower one, and every level this machine executes passes
the oracle rule."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dotattn.engines import _tiled_kernel

pytestmark = pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason=str(_tiled_kernel.MISSING))

RUNS_HERE = [level for level in _tiled_kernel.LEVELS
             if _tiled_kernel._RUNS_ON[level] is None
             or torch.backends.cpu.get_cpu_capability() in _tiled_kernel._RUNS_ON[level]]

SMOKE = textwrap.dedent("""
    import torch
    from dotattn import masks
    from dotattn.engines import _tiled_kernel
    from dotattn.testing import assert_matches_oracle
    print(_tiled_kernel.LEVEL)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 4, 70, 24, generator=g).to(dtype) for _ in range(3))
        for kwargs in ({}, {"is_causal": True}, {"mask": masks.sliding_window(9) & masks.padding([70, 31])}):
            for engine in ("tiled", "split_k"):
                assert_matches_oracle(q, k, v, engine=engine, **kwargs, backward=engine == "tiled")
    print("ok")
""")


def test_every_level_is_built_for_this_machine():
    """All three modules exist, avx512 included, whatever this CPU runs."""
    for level in _tiled_kernel.LEVELS:
        assert importlib.util.find_spec(f"dotattn._tiled_cpu_{level}") is not None, level


@pytest.mark.parametrize("level", _tiled_kernel.LEVELS)
def test_importing_any_level_directly_loads_it_or_raises_import_error(level):
    """Tools that walk the package (documentation builders) import every level: one this CPU
    lacks the instructions for raises ImportError naming them, it does not die of SIGILL."""
    code = f"import dotattn._tiled_cpu_{level} as m; print(m.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if level in RUNS_HERE:
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == f"dotattn._tiled_cpu_{level}"
    else:
        assert done.returncode == 1, (done.returncode, done.stderr[-2000:])  # not killed by a signal
        assert "ImportError: this CPU lacks" in done.stderr, done.stderr[-2000:]


def test_the_loaded_level_registers_the_split_k_operators_kernel():
    """Registered by the level dotattn loads (register_ops), not when a library is loaded."""
    from dotattn import _ops  # noqa: F401  (defines the operator)

    for key in ("CPU", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dotattn::split_k", key), key


def test_the_best_level_this_cpu_runs_is_loaded():
    assert _tiled_kernel.LEVEL == RUNS_HERE[0]


@pytest.mark.parametrize("level", RUNS_HERE)
def test_each_level_this_cpu_runs_matches_the_oracle(level):
    env = {**os.environ, "DOTATTN_CPU_LEVEL": level}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [level, "ok"]


def test_a_cpu_without_avx512_never_loads_it():
    """ATEN_CPU_CAPABILITY=avx2 makes torch report an AVX2 CPU, as on AMD Zen 3."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("TRITON_INTERPRET", None)
    code = "from dotattn.engines import _tiled_kernel; print(_tiled_kernel.LEVEL)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "avx2"


def test_an_unknown_level_names_the_choices():
    env = {**os.environ, "DOTATTN_CPU_LEVEL": "sse9"}
    done = subprocess.run([sys.executable, "-c", "import dotattn"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "use one of avx512, avx2, baseline" in done.stderr


def test_the_module_records_the_torch_it_was_built_against():
    assert _tiled_kernel.ext.torch_version == torch.__version__


def test_another_torch_gets_a_warning_and_the_torch_ops_path():
    """A kernel built for torch X under torch Y is not loaded (its symbols are X's): import warns
    once, names both versions and the fix, and the engines still run, in torch ops."""
    code = textwrap.dedent("""
        import warnings
        import torch
        torch.__version__ = "2.99.0+cpu"  # as if another torch were installed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import dotattn
            from dotattn.engines import _tiled_kernel
        print(len(caught), caught[0].category.__name__, _tiled_kernel.ext is None)
        print(caught[0].message)
        q = torch.randn(1, 2, 8, 4)
        print(dotattn.explain(q, q, q, engine="tiled"))
        dotattn.scaled_dot_product_attention(q, q, q, engine="tiled")
    """)
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, message, *explained = done.stdout.splitlines()
    assert first == "1 RuntimeWarning True"
    assert f"built against torch {torch.__version__}" in message and "2.99.0+cpu" in message
    assert "pip install --no-build-isolation" in message
    assert "torch ops" in "\n".join(explained)


def test_a_build_without_torch_stops_and_says_how_to_build(tmp_path):
    """pip's isolated build has no torch: setup.py stops with the way to build the kernel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('no torch in this build environment')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "pip install --no-build-isolation" in done.stderr + done.stdout
    env["DOTATTN_NO_KERNEL"] = "1"
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("dotattn")
