"""Builds dotattn's compiled CPU kernel (dotattn._tiled_cpu) when torch is importable.

The kernel is optional: without torch at build time (an isolated build), or if the
compiler fails, dotattn installs without it and the tiled engine runs in torch ops,
which ``dotattn.explain`` reports. ``make test`` / ``make demo`` install torch first
and build with ``--no-build-isolation``, so the kernel is compiled for this machine.
"""

from __future__ import annotations

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # no torch in the build environment: pure-Python install
    pass
else:
    ext_modules.append(
        CppExtension(
            "dotattn._tiled_cpu",
            ["src/dotattn/csrc/tiled.cpp", "src/dotattn/csrc/split_k.cpp", "src/dotattn/csrc/bindings.cpp"],
            # the headers they include: an sdist carries them, and a change rebuilds
            depends=["src/dotattn/csrc/common.h", "src/dotattn/csrc/kernels.h"],
            # Built and run on the same machine, so tune for it; OpenMP resolves to the
            # libgomp torch already loaded (same soname), so there is one thread pool.
            # -ffp-contract=fast: a*b+c becomes one rounding (the exp's reduction relies on it).
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
