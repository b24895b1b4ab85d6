"""The benchmarks' choice of llama.cpp: runtime_speed's `--llama-lib` and the build it reports,
server_load's `--llama-server`.

The benchmarks compare llmctl with llama.cpp; on a CPU with more than AVX2, the fair comparison is
a llama.cpp compiled for that CPU, so the table must say which build it measured, and a peer that
is not there must be an error, not a silent llmctl-only run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import runtime_speed, server_load


def test_llama_lib_without_libllama_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        runtime_speed.parse_args(["--llama-lib", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--llama-lib: no libllama.so in {tmp_path}" in err


def test_llama_build_names_the_bootstrap_build_and_its_simd(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/bootstrap.sh")
    monkeypatch.delenv(runtime_speed.LLAMA_LIB_ENV, raising=False)
    build = runtime_speed.llama_build()
    assert build.startswith("llama-cpp-python's own build, compiled for ")
    assert "AVX2" in build.split(", compiled for ")[1].split(", ")  # scripts/bootstrap.sh's flags


def test_llama_build_from_a_directory_without_llama_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/bootstrap.sh")
    monkeypatch.setenv(runtime_speed.LLAMA_LIB_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        runtime_speed.llama_build()
    assert str(exc.value).startswith(f"runtime_speed: cannot load llama.cpp from the libraries in `{tmp_path}`: ")


def test_server_load_refuses_a_missing_llama_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "llama-server"
    with pytest.raises(SystemExit) as exc:
        server_load.main(["--llama-server", str(missing)])
    assert exc.value.code == 2
    assert f"--llama-server: no such file: {missing}" in capsys.readouterr().err
