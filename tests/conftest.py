"""Shared fixtures: llama.cpp (llama-cpp-python) as the numerical oracle, and the Docker engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel_sets import SETS, using


@pytest.fixture(scope="session")
def llama_oracle() -> Callable[..., Any]:
    """A factory `(path, n_ctx=...) -> llama_cpp.Llama` with logits for every position.

    llama.cpp runs with its default settings, as users get it: Q4_0 matrices of a multiple of 8
    rows repacked (summed block by block, which the runtime follows: BLOCK_ORDER in kernels.c),
    the rest on ggml's reference CPU path (vec_dot and llamafile's tinyBLAS). scripts/bootstrap.sh
    builds it for AVX2 without -march=native, so no AMX buffer type (whose batched Q8_0/Q4_0
    products crash, ggml-org/llama.cpp issue 20824). Flash attention is off: the runtime
    reproduces the classic softmax(QK^T)V path.
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/bootstrap.sh")

    def load(path: Path, n_ctx: int = 512, **kw: Any) -> Any:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=512,
            logits_all=True,
            flash_attn=False,
            verbose=False,
            **kw,
        )

    return load


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    """The local Docker engine; the tests that need it are skipped, saying why, when it is absent."""
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed (pip install docker)")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # no engine, no socket access
        pytest.skip(f"the Docker engine is not reachable: {e}")
    yield client
    client.close()


@pytest.fixture(params=SETS)
def kernel_set(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kernel set in turn (tests/kernel_sets.py); skipped, saying so, where the CPU lacks it."""
    with using(request.param):
        yield request.param
