"""The runtime's kernel sets, for the tests that run on each: the portable fallback, AVX2, AVX2
with AVX-VNNI, and AVX-512 with VNNI; and avxvnni-evex, the AVX-VNNI set's code with AVX-512's
encoding of its VNNI instruction, which tests that code on the CPUs with AVX-512 VNNI, most of
which lack AVX-VNNI (AVXVNNI_TWIN in runtime/kernels/kernels.c)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

SETS = ["generic", "avx2", "avxvnni", "avxvnni-evex", "avx512vnni"]


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Run the block on kernel set `name`, then go back to `auto`; skip the test, saying so, if
    this CPU lacks the set."""
    from runtime.kernels import _kernels  # here, not at import: conftest.py loads this module for every test

    try:
        _kernels.use(name)
    except ValueError:
        pytest.skip(f"this CPU has no {name} kernels")
    try:
        yield
    finally:
        _kernels.use("auto")
