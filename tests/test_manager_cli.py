"""The ``llmctl`` command line: version, usage errors, and errors from the runtime on one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager import cli


def test_version_prints_program_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("llmctl ")


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: llmctl" in capsys.readouterr().err


def test_unknown_model_verb_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["model", "frobnicate", "x.gguf"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_model_info_on_a_file_that_is_not_gguf_fails_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file\n" * 4)

    assert cli.main(["model", "info", str(bogus)]) == 1

    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert "not-a-model.gguf" in lines[0]  # the message says which file


def test_debug_shows_the_runtime_error_with_its_traceback(tmp_path: Path) -> None:
    from runtime.errors import GGUFError

    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file\n" * 4)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        cli.main(["--debug", "model", "info", str(bogus)])
