"""The wheel a user installs: built from this checkout by ``make wheel`` (``python -m build``,
then ``auditwheel repair`` for an honest manylinux tag, torch's libraries left out: the wheel
needs the torch it was built against), installed into a fresh virtual environment
that has only torch and numpy, and run there from outside the checkout with no compiler on
PATH: at every instruction-set level this CPU executes, ``dotattn check --quick`` passes (every
engine against the oracle) and ``explain`` names the level that ran.

The build reuses the objects ``make`` compiled (setup.py keeps each level's in build/objects),
so it only links; installing torch into the fresh environment takes the most time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from dotattn.engines import _tiled_kernel

ROOT = Path(__file__).resolve().parent.parent
RUNS_HERE = [level for level in _tiled_kernel.LEVELS
             if _tiled_kernel._RUNS_ON[level] is None
             or torch.backends.cpu.get_cpu_capability() in _tiled_kernel._RUNS_ON[level]]

pytestmark = [
    pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason=str(_tiled_kernel.MISSING)),
    pytest.mark.skipif(importlib.util.find_spec("build") is None or shutil.which("auditwheel", path=os.path.dirname(
        sys.executable)) is None or shutil.which("make") is None,
        reason="build, auditwheel or make is missing (pip install 'dotattn[dev]')"),
]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The sdist and the repaired wheel, as ``make wheel`` builds them from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    _run(["make", "-s", "-C", str(ROOT), "wheel", f"PY={sys.executable}", f"DIST={out}"])
    assert list(out.glob("dotattn-*.tar.gz")), "no sdist"
    (repaired,) = out.glob("dotattn-*.whl")
    return repaired


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new virtual environment with the torch this checkout's kernel was built against, numpy,
    and the wheel (its declared dependencies are met, so pip installs nothing else)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, f"torch=={torch.__version__.split('+')[0]}", "numpy"])
    _run([*pip, str(wheel)])
    return venv


def test_the_wheel_carries_every_level_and_a_manylinux_tag(wheel):
    assert "manylinux_2_" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for level in _tiled_kernel.LEVELS:  # avx512 too, whatever this CPU runs: built, never chosen without it
        assert any(n.startswith(f"dotattn/_tiled_cpu_{level}.") and n.endswith(".so") for n in names), level
    assert "dotattn/_kernel_info.py" in names
    assert not any(Path(n).name.startswith(("libtorch", "libc10", "libgomp")) for n in names), "torch's libraries vendored"


SMOKE = textwrap.dedent("""
    import torch, dotattn
    from dotattn.engines import _tiled_kernel
    q = torch.randn(1, 4, 64, 32)
    print(_tiled_kernel.LEVEL, dotattn.__file__)
    print(dotattn.explain(q, q, q, is_causal=True, engine="tiled"))
""")


@pytest.mark.parametrize("level", RUNS_HERE)
def test_the_installed_wheel_passes_the_oracle_at_each_level_this_cpu_runs(fresh_venv, level, tmp_path):
    bin_dir = fresh_venv / "bin"
    # no compiler on PATH, nothing of the checkout on sys.path, run from elsewhere
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "DOTATTN_CPU_LEVEL": level, "CC": "false", "CXX": "false"}
    done = _run([str(bin_dir / "python"), "-c", SMOKE], env=env, cwd=tmp_path)
    first, *explained = done.stdout.splitlines()
    loaded, where = first.split()
    assert loaded == level and str(fresh_venv) in where
    assert f"compiled kernel ({level})" in "\n".join(explained)
    done = _run([str(bin_dir / "dotattn"), "check", "--quick"], env=env, cwd=tmp_path)
    assert "0 failed" in done.stdout, done.stdout[-2000:]


def test_the_installed_wheel_never_loads_avx512_on_a_cpu_without_it(fresh_venv, tmp_path):
    """ATEN_CPU_CAPABILITY=avx2: torch reports an AVX2 CPU, as on AMD Zen 3."""
    env = {"PATH": str(fresh_venv / "bin"), "HOME": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2"}
    done = _run([str(fresh_venv / "bin" / "python"), "-c", SMOKE], env=env, cwd=tmp_path)
    assert done.stdout.split()[0] == "avx2"
