"""Builds dotattn's compiled CPU kernel when torch is importable: one extension module per
x86-64 instruction-set level, and the best one this CPU runs is loaded at import.

    dotattn._tiled_cpu_avx512    -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
    dotattn._tiled_cpu_avx2      -march=x86-64-v3 (AVX2, FMA, BMI)
    dotattn._tiled_cpu_baseline  -march=x86-64-v2 (SSE4.2: any x86-64 CPU of the last 15 years)

``dotattn.engines._tiled_kernel`` picks among them by torch's own CPU capability, so a wheel
built on one machine runs on any other (no SIGILL from instructions the CPU lacks);
DOTATTN_CPU_LEVEL=avx2 (or baseline) forces a lower level. DOTATTN_MARCH_NATIVE=1 builds one
module for the building machine alone (-march=native, loaded as the top level), for a local
build that never moves. On another architecture, the baseline module is built with the
compiler's defaults.

Without torch at build time (pip's isolated build) the build stops and says how to build
the kernel (DOTATTN_NO_KERNEL=1 installs without it on purpose); if the compiler fails,
dotattn installs without it and the tiled engine runs in torch ops, which ``dotattn.explain``
reports. A module records the torch it was built against, and dotattn loads it only under
that torch. ``make test`` / ``make demo`` install torch first and build with
``--no-build-isolation``.
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import setup

SOURCES = ["src/dotattn/csrc/tiled.cpp", "src/dotattn/csrc/split_k.cpp", "src/dotattn/csrc/spans.cpp",
           "src/dotattn/csrc/bindings.cpp"]
HEADERS = sorted(glob.glob("src/dotattn/csrc/*.h"))
# OpenMP resolves to the libgomp torch already loaded (same soname), so there is one thread pool.
# -ffp-contract=fast: a*b+c becomes one rounding (the exp's reduction relies on it).
COMMON = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"]


def levels() -> dict[str, list[str]]:
    """Module suffix -> the -march flags it is built with."""
    if os.environ.get("DOTATTN_MARCH_NATIVE") == "1":
        return {"avx512": ["-march=native"]}  # loaded first; built for this machine only
    if platform.machine().lower() in ("x86_64", "amd64"):
        return {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "baseline": ["-march=x86-64-v2"]}
    return {"baseline": []}


ext_modules = []
cmdclass = {}
try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch in the build environment, as in pip's isolated builds
    if os.environ.get("DOTATTN_NO_KERNEL") != "1":
        raise SystemExit(
            "dotattn builds its compiled CPU kernel against the installed torch, but this build "
            "environment has no torch (pip's build isolation). Install torch first, then build "
            "without isolation: pip install torch setuptools wheel ninja && pip install "
            "--no-build-isolation . (or set DOTATTN_NO_KERNEL=1 to install without the kernel: "
            "the tiled engine then runs in torch ops, several times slower)") from None
else:
    # The torch the kernel is built against, readable before loading the kernel (which links to
    # that torch's libraries): dotattn checks it at import (engines/_tiled_kernel.py).
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "dotattn", "_kernel_info.py"), "w") as f:
        f.write(f'"""Written by setup.py: the torch the compiled kernel was built against."""\n\n'
                f'TORCH_VERSION = "{torch.__version__}"\n')
    for level, march in levels().items():
        ext_modules.append(CppExtension(
            f"dotattn._tiled_cpu_{level}", SOURCES, depends=HEADERS,
            # the torch it is built against, which dotattn checks when it loads the module
            define_macros=[("DOTATTN_TORCH_VERSION", f'"{torch.__version__}"')],
            extra_compile_args=[*COMMON, *march], extra_link_args=["-fopenmp"], optional=True,
        ))
    class BuildPerLevel(BuildExtension.with_options(use_ninja=True)):
        """Each level's objects in a folder of its own, kept between builds (the levels compile the
        same sources with other flags): an editable install and a wheel built after it share them,
        so the second build only links."""

        def build_extension(self, ext) -> None:
            self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "objects", ext.name)
            super().build_extension(ext)

    cmdclass["build_ext"] = BuildPerLevel

setup(ext_modules=ext_modules, cmdclass=cmdclass)
