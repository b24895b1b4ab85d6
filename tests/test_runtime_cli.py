"""`python -m runtime` as a user runs it: real subprocesses on a tiny generated model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from runtime import Model
from runtime.testing.make_model import make_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fib(n):"
STATS = re.compile(
    r"^prompt: (\d+) tokens, ([\d.]+|-) tokens/s \| generated: (\d+) tokens, ([\d.]+|-) tokens/s "
    r"\| finish: (stop|length) \| seed: (\d+)$"
)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {
        "q8_0": make_model(d / "tiny-q8_0.gguf", wtype="q8_0"),
        "f32": make_model(d / "tiny-f32.gguf"),
        "starcoder": make_model(d / "tiny-starcoder.gguf", arch="starcoder", wtype="f16"),
    }


@pytest.fixture(scope="module")
def api(models: dict[str, Path]) -> Iterator[Model]:
    with Model.load(models["f32"], n_threads=1) as m:
        yield m


# --- info --------------------------------------------------------------------------------------


def test_info_text(models: dict[str, Path]) -> None:
    path = models["q8_0"]
    p = cli("info", str(path))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in p.stdout.splitlines() if "  " in line.strip())
    r = gguf.GGUFReader(path)
    types = Counter(t.tensor_type.name for t in r.tensors)
    assert rows["architecture"] == "starcoder2"
    assert rows["name"] == "llmctl-test-starcoder2-tiny"
    assert rows["file size"].endswith(f"({path.stat().st_size} bytes)")
    assert rows["parameters"].endswith(f"({sum(int(t.n_elements) for t in r.tensors)})")
    assert rows["tensor types"] == f"Q8_0: {types['Q8_0']}, F32: {types['F32']}"
    assert rows["file type"] == "MOSTLY_Q8_0"
    for key, value in {"n_embd": "64", "n_layer": "2", "n_head": "4", "n_head_kv": "2", "n_vocab": "1000"}.items():
        assert rows[key] == value, key
    assert rows["norm_eps"] == "1e-05" and rows["rope_freq_base"] == "10000.0"
    assert rows["tokenizer"] == "gpt2 (pre-tokenizer starcoder)"
    assert rows["vocab size"] == "1000" and rows["eos"] == "0 <|endoftext|>" and rows["add_bos"] == "false"
    assert rows["prefix"] == "1 <fim_prefix>" and rows["middle"] == "2 <fim_middle>" and rows["sep"] == "6 <file_sep>"


def test_info_json(models: dict[str, Path]) -> None:
    path = models["starcoder"]
    p = cli("info", str(path), "-o", "json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    r = gguf.GGUFReader(path)
    assert info["file"] == str(path) and info["file_size"] == path.stat().st_size
    assert info["architecture"] == "starcoder" and info["gguf_version"] == 3
    assert info["parameters"] == sum(int(t.n_elements) for t in r.tensors)
    assert info["tensors"] == len(r.tensors)
    assert info["tensor_types"] == dict(Counter(t.tensor_type.name for t in r.tensors))
    assert info["hyperparameters"] == {
        "n_vocab": 1000,
        "n_ctx_train": 512,
        "n_embd": 64,
        "n_layer": 2,
        "n_ff": 256,
        "n_head": 4,
        "n_head_kv": 1,
        "norm_eps": 1e-05,
        "head_dim": 16,
    }
    assert info["tokenizer"] == {
        "model": "gpt2",
        "pre": "starcoder",
        "vocab_size": 1000,
        "merges": len(r.fields["tokenizer.ggml.merges"].contents()),
        "bos": {"id": 0, "text": "<|endoftext|>"},
        "eos": {"id": 0, "text": "<|endoftext|>"},
        "add_bos": False,
    }
    assert info["fim_tokens"] == {
        "prefix": {"id": 1, "text": "<fim_prefix>"},
        "suffix": {"id": 3, "text": "<fim_suffix>"},
        "middle": {"id": 2, "text": "<fim_middle>"},
        "pad": {"id": 4, "text": "<fim_pad>"},
        "repo": {"id": 5, "text": "<repo_name>"},
        "sep": {"id": 6, "text": "<file_sep>"},
    }


# --- generate ----------------------------------------------------------------------------------


def stats(p: subprocess.CompletedProcess[str]) -> re.Match[str]:
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    m = STATS.match(lines[0])
    assert m, lines[0]
    return m


def test_generate_greedy_matches_the_api(models: dict[str, Path], api: Model) -> None:
    p = cli("generate", "-m", str(models["f32"]), "-p", PROMPT, "-n", "12", "--temperature", "0", "--threads", "1")
    assert p.returncode == 0, p.stderr
    expect = api.complete(PROMPT, max_tokens=12, temperature=0)
    assert p.stdout == expect.text + "\n"
    s = stats(p)
    assert int(s[1]) == expect.prompt_tokens == len(api.tokenize(PROMPT))
    assert int(s[3]) == 12 and s[5] == "length"


def test_generate_passes_every_sampling_option(models: dict[str, Path], api: Model) -> None:
    opts = {"temperature": 1.3, "top_k": 20, "top_p": 0.9, "min_p": 0.02, "repeat_penalty": 1.3, "repeat_last_n": 8}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    p = cli("generate", "-m", str(models["f32"]), "-p", PROMPT, "-n", "16", "--seed", "5", "-c", "64", *args)
    assert p.returncode == 0, p.stderr
    expect = api.complete(PROMPT, max_tokens=16, seed=5, **opts)  # type: ignore[arg-type]
    assert p.stdout == expect.text + "\n"
    assert stats(p)[6] == "5"
    assert api.complete(PROMPT, max_tokens=16, seed=5).text != expect.text  # the options mattered


def test_generate_stop_and_infill(models: dict[str, Path], api: Model) -> None:
    full = api.complete(PROMPT, max_tokens=20, temperature=0).text
    stop = full[8:11]
    p = cli(
        "generate", "-m", str(models["f32"]), "-p", PROMPT, "-n", "20", "--temp", "0", "--stop", "@@", "--stop", stop
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == full[: full.find(stop)] + "\n" and stats(p)[5] == "stop"

    p = cli(
        "generate", "-m", str(models["f32"]), "-p", "def f(x):\n    ", "--infill-suffix", "\n    return y\n", "-n", "6"
    )
    assert p.returncode == 0, p.stderr
    seed = int(stats(p)[6])  # a random seed, reported so the run can be repeated
    expect = "".join(api.infill("def f(x):\n    ", "\n    return y\n", max_tokens=6, seed=seed))  # type: ignore[arg-type]
    assert p.stdout == expect + "\n"
    assert int(stats(p)[1]) == len(api.infill_ids("def f(x):\n    ", "\n    return y\n"))


def test_generate_zero_tokens(models: dict[str, Path]) -> None:
    p = cli("generate", "-m", str(models["q8_0"]), "-p", PROMPT, "-n", "0")
    assert p.returncode == 0 and p.stdout == "\n"
    assert stats(p)[3] == "0" and stats(p)[2] == stats(p)[4] == "-"


@pytest.mark.parametrize("wtype", ["q4_0", "q8_0"])
def test_generate_with_and_without_repacking(tmp_path: Path, wtype: str) -> None:
    """--no-repack keeps Q4_0 and Q8_0 matrices in the file's layout (runtime/repack.py; Q8_0 is
    repacked by default on CPUs with AVX-512): the same text."""
    path = make_model(tmp_path / f"{wtype}.gguf", wtype=wtype)
    texts = [
        cli("generate", "-m", str(path), "-p", PROMPT, "-n", "12", "--temp", "0", *extra).stdout
        for extra in ([], ["--no-repack"])
    ]
    assert texts[0] == texts[1] and len(texts[0]) > 1


# --- errors ------------------------------------------------------------------------------------


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["info", "generate"])
def test_not_a_gguf_file(tmp_path: Path, command: str) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("just some text, not a model\n" * 3)
    args = ["info", str(bogus)] if command == "info" else ["generate", "-m", str(bogus), "-p", "x"]
    one_line_error(cli(*args), str(bogus), "not a GGUF file")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_missing_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nope.gguf"
    args = ["info", str(missing)] if command == "info" else ["generate", "-m", str(missing), "-p", "x"]
    p = cli(*args)
    one_line_error(p, str(missing), "no such file")
    assert p.stdout == ""


def test_runtime_errors_are_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    m = str(models["q8_0"])
    one_line_error(cli("generate", "-m", m, "-p", PROMPT, "-n", "1000"), "exceeds the context window of 512")
    one_line_error(cli("generate", "-m", m, "-p", PROMPT, "--top-p", "0"), "top_p must be in (0, 1]")
    one_line_error(cli("generate", "-m", str(models["starcoder"]), "-p", "x", "-c", "600"), "learned positions")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(models["q8_0"].read_bytes()[:-100])
    one_line_error(cli("info", str(truncated)), str(truncated), "truncated")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 40)
    for args in (["--debug", "info", str(bogus)], ["info", str(bogus), "--debug"]):
        p = cli(*args)
        assert p.returncode == 1
        assert "Traceback" in p.stderr and "GGUFError" in p.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["generate", "-p", "x"], "the following arguments are required: -m/--model"),
        (["generate", "-m", "x.gguf", "-p", "x", "-n", "-5"], "--n-predict must be at least -1"),
        (["generate", "-m", "x.gguf", "-p", "x", "--temperature", "hot"], "--temperature must be a number"),
        (["generate", "-m", "x.gguf", "-p", "x", "--threads", "0"], "--threads must be at least 1"),
        (["info", "x.gguf", "-o", "yaml"], "invalid choice: 'yaml'"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    p = cli(*args)
    assert p.returncode == 2
    assert "usage: python -m runtime" in p.stderr and message in p.stderr
    assert "Traceback" not in p.stderr


def test_help_explains_options_and_defaults() -> None:
    p = cli("generate", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for option, default in [
        ("--temperature", "0.8"),
        ("--top-k", "40"),
        ("--top-p", "0.95"),
        ("--min-p", "0.05"),
        ("--repeat-penalty", "1.0"),
        ("--n-predict", "128"),
    ]:
        assert re.search(re.escape(option) + r".*?\(default: " + re.escape(default) + r"\)", text), option
    for option in ("--stop", "--seed", "--threads", "--ctx-size", "--infill-suffix", "--debug"):
        assert option in text
    top = cli("--help")
    assert top.returncode == 0 and "info" in top.stdout and "generate" in top.stdout


# --- interruption ------------------------------------------------------------------------------


def _interactive_sigint() -> None:
    """In the child before exec: SIGINT handled by default, as under a terminal. A test run started
    in the background (`cmd &` in a script, nohup) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_long_generation(models: dict[str, Path]) -> subprocess.Popen[bytes]:
    """Greedy generation that runs for ~20 s (this prompt does not meet end-of-text early)."""
    return subprocess.Popen(
        [sys.executable, "-m", "runtime", "generate", "-m", str(models["f32"]), "-p", PROMPT, "-n", "-1"]
        + ["-c", "20000", "--temperature", "0", "--threads", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_interactive_sigint,
    )


def test_ctrl_c_exits_130_quietly(models: dict[str, Path]) -> None:
    proc = _start_long_generation(models)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(20)  # generation is under way
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 10
        assert proc.returncode == 130
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_closed_stdout_ends_quietly(models: dict[str, Path]) -> None:
    """`python -m runtime generate ... | head -c 20`: no traceback when the reader goes away."""
    proc = _start_long_generation(models)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(20)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=30)
        assert proc.returncode == 1
        assert b"Traceback" not in err and b"Exception ignored" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_in_process_returns_codes(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """runtime.cli.main returns its exit code (as manager/cli.py calls it) instead of exiting."""
    from runtime import cli as runtime_cli

    assert runtime_cli.main(["info", str(models["q8_0"]), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "starcoder2"
    assert runtime_cli.main(["info", "/nonexistent/x.gguf"]) == 1
    assert capsys.readouterr().err.startswith("error: /nonexistent/x.gguf: no such file")
    assert runtime_cli.main(["info"]) == 2
    assert runtime_cli.main(["--help"]) == 0
