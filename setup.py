"""Builds the runtime's C/Cython kernels. Metadata lives in pyproject.toml."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

kernels = Extension(
    "runtime.kernels._kernels",
    sources=["runtime/kernels/_kernels.pyx", "runtime/kernels/kernels.c", "runtime/kernels/forward.c"],
    # the C files include these: a change to them rebuilds it
    depends=["runtime/kernels/kernels.h", "runtime/kernels/kernels_impl.h", "runtime/kernels/forward.h"],
    include_dirs=["runtime/kernels", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    # Portable baseline code; AVX2 kernels are compiled per function and picked at run time.
    # No contraction of a * b + c into FMA: ggml's rounding is reproduced step by step, and every
    # fused step is written as one (GCC's ISO C mode already defaults to this; clang does not).
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-fno-math-errno", "-ffp-contract=off"],
    extra_link_args=["-fopenmp"],
    # expf, cosf, sinf and fmaf: libm, named rather than borrowed from the interpreter's process
    libraries=["m"],
)

setup(ext_modules=cythonize([kernels], language_level="3"))
