"""Shared fixtures: llama.cpp (llama-cpp-python) as the numerical oracle, and the Docker engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel_sets import SETS, using


@pytest.fixture(scope="session")
def llama_oracle() -> Iterator[Callable[..., Any]]:
    """A factory `(path, n_ctx=...) -> llama_cpp.Llama` with logits for every position.

    llama.cpp's extra buffer types are turned off: on AMX CPUs its AMX matmul crashes on batched
    Q8_0/Q4_0 products (ggml-org/llama.cpp issue 20824), and Q4_0 repacking would change the
    summation order. What remains is ggml's reference CPU path: vec_dot and llamafile's tinyBLAS.
    Flash attention is off: the runtime reproduces the classic softmax(QK^T)V path.
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/bootstrap.sh")
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:

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

        yield load
    finally:
        capi.llama_model_default_params = default


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
