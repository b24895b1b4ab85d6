"""`python -m runtime serve` as clients use it: a real server on loopback (a subprocess), driven by
the official `openai` client and by raw HTTP for the llama.cpp endpoints and bad inputs.

The model is the generated `small` StarCoder2 preset in Q8_0 with an 8192-token context: batched
decoding of Q8_0 weights is bit-identical to decoding one sequence, so greedy outputs served under
load must equal the in-process greedy outputs exactly. Greedy continuations of the prompts used as
"long requests" run to the length limit (thousands of tokens), which is what the disconnect,
queue-full and SIGTERM tests rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from runtime import Model
from runtime.errors import ModelError
from runtime.gguf import read_gguf
from runtime.repack import repackable, types_to_repack
from runtime.testing.make_model import make_model
from tests.netutil import free_port
from tests.polling import until

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 8192
PROMPT = "def fib(n):"
LONG_PROMPT = "def fib(n):"  # greedy: no end of text within thousands of tokens
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n\nprint(add(1, 2))\n"
STARTUP_TIMEOUT = 60.0


# --- a server subprocess -----------------------------------------------------------------------


class Server:
    """`python -m runtime serve` on a free loopback port, its output in a log file."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "runtime", "serve", "-m", str(model), "--port", str(self.port)]
        cmd += ["--threads", "1", "--ctx", str(N_CTX), "--no-access-log", *args]
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(model, log, *args, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("server") / "small-q8.gguf", preset="small", wtype="q8_0")


@pytest.fixture(scope="session")
def model(model_file: Path) -> Iterator[Model]:
    """The same model in-process: the reference for greedy outputs."""
    with Model.load(model_file, n_threads=1, n_ctx=N_CTX) as m:
        yield m


@pytest.fixture(scope="session")
def server(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with running(model_file, log, "--parallel", "4") as s:
        yield s
        assert "Traceback" not in s.output(), s.output()


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture()
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(model: Model, prompt: str | list[int], n: int, stop: list[str] | None = None) -> str:
    return model.complete(prompt, max_tokens=n, temperature=0, stop=stop or []).text


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """The JSON payloads of a server-sent event stream ("[DONE]" as the string)."""
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        yield data if data == "[DONE]" else json.loads(data)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    if not until(cond, timeout, every=0.05):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def busy_slots(url: str, headers: dict[str, str] | None = None) -> float:
    return metric(httpx.get(f"{url}/metrics", headers=headers, timeout=10).text, "llmctl_busy_slots")


# --- OpenAI API, with the official client ------------------------------------------------------


def test_health_and_models(http: httpx.Client, oai: openai.OpenAI, model_file: Path) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = oai.models.list().data
    assert [m.id for m in models] == [model_file.stem]
    assert models[0].object == "model"


def test_completion_is_the_greedy_continuation(oai: openai.OpenAI, model: Model) -> None:
    r = oai.completions.create(model="anything", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert choice.text == greedy(model, PROMPT, 24)
    assert choice.finish_reason == "length"
    assert r.usage is not None
    n_prompt = len(model.tokenize(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)


def test_completion_default_max_tokens_is_16(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="m", prompt="import os\n", temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 16


def test_completion_stream(oai: openai.OpenAI, model: Model) -> None:
    chunks = list(
        oai.completions.create(
            model="m", prompt=PROMPT, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(model, PROMPT, 20)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert all(c.object == "text_completion" for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 20 and not chunks[-1].choices


def test_completion_token_id_prompt(oai: openai.OpenAI, model: Model) -> None:
    ids = model.tokenize(PROMPT)
    a = oai.completions.create(model="m", prompt=ids, max_tokens=12, temperature=0)
    b = oai.completions.create(model="m", prompt=[PROMPT], max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text == greedy(model, PROMPT, 12)


def test_seed_reproducibility(oai: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = oai.completions.create(model="m", prompt="import ", max_tokens=24, temperature=1.0, seed=seed)
        return r.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_logprobs(oai: openai.OpenAI, model: Model) -> None:
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0
        assert 1 <= len(top) <= 3
        assert top[token] == pytest.approx(logprob)  # greedy: the chosen token is the most likely
        assert max(top.values()) == pytest.approx(logprob)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo(oai: openai.OpenAI, model: Model) -> None:
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=1)
    assert r.choices[0].text == PROMPT + greedy(model, PROMPT, 6)
    lp = r.choices[0].logprobs
    n_prompt = len(model.tokenize(PROMPT))
    assert lp is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert lp.token_logprobs[:n_prompt] == [None] * n_prompt  # prompt log-probabilities are not computed
    assert all(x is not None for x in lp.token_logprobs[n_prompt:])
    assert lp.text_offset[n_prompt] == len(PROMPT)
    zero = oai.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True)
    assert zero.choices[0].text == PROMPT and zero.usage is not None and zero.usage.completion_tokens == 0


def test_suffix_is_fill_in_the_middle(oai: openai.OpenAI, model: Model) -> None:
    r = oai.completions.create(model="m", prompt=PREFIX, suffix=SUFFIX, max_tokens=16, temperature=0)
    assert r.choices[0].text == greedy(model, model.infill_ids(PREFIX, SUFFIX), 16)


def chat_reference(model: Model, messages: list[dict[str, str]], n: int) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    out = model.complete(model.tokenize(text, special=False), max_tokens=n, temperature=0, stop=["\nuser:"]).text
    return out[1:] if out.startswith(" ") else out


def test_chat(oai: openai.OpenAI, model: Model) -> None:
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A fib function?"}]
    r = oai.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat_reference(model, messages, 16)
    assert r.usage is not None and r.usage.completion_tokens <= 16

    chunks = list(
        oai.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True)  # type: ignore[arg-type]
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_logprobs(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = oai.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and 1 <= len(content) <= 4
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_stop_string(oai: openai.OpenAI, http: httpx.Client, model: Model) -> None:
    full = greedy(model, PROMPT, 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.index(stop)]
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    j = http.post("/completion", json={"prompt": PROMPT, "n_predict": 30, "temperature": 0, "stop": [stop]}).json()
    assert j["content"] == want and j["stop_type"] == "word" and j["stopping_word"] == stop


def test_prefix_reuse(http: httpx.Client, oai: openai.OpenAI, model: Model) -> None:
    prompt = "# a long shared file header\n" * 20 + "def main():\n"
    first = http.post("/completion", json={"prompt": prompt, "n_predict": 4, "temperature": 0}).json()
    second = http.post("/completion", json={"prompt": prompt + "    ", "n_predict": 4, "temperature": 0}).json()
    n = len(model.tokenize(prompt))
    assert first["tokens_evaluated"] == n
    assert second["tokens_cached"] >= n - 1  # the whole shared prefix came from the slot's cache
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - second["tokens_cached"]
    r = oai.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert (r.usage.prompt_tokens_details.cached_tokens or 0) >= n - 1
    assert r.choices[0].text == first["content"] == greedy(model, prompt, 4)


# --- llama.cpp API, raw HTTP -------------------------------------------------------------------


def test_llama_completion(http: httpx.Client, model: Model) -> None:
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0, "n_probs": 2})
    assert r.status_code == 200
    j = r.json()
    assert j["content"] == greedy(model, PROMPT, 16)
    assert j["stop"] is True and j["stop_type"] == "limit"
    assert j["tokens_predicted"] == 16 and j["tokens_evaluated"] == len(model.tokenize(PROMPT))
    assert j["generation_settings"]["n_ctx"] == N_CTX and j["generation_settings"]["temperature"] == 0
    assert set(j["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}
    probs = j["completion_probabilities"]
    assert len(probs) == 16 and all(len(p["top_logprobs"]) == 2 for p in probs)
    assert b"".join(bytes(p["bytes"]) for p in probs).decode(errors="replace") == j["content"]
    ids = http.post("/completion", json={"prompt": model.tokenize(PROMPT), "n_predict": 16, "temperature": 0})
    assert ids.json()["content"] == j["content"]


def test_llama_completion_stream(http: httpx.Client, model: Model) -> None:
    body = {"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stream": True, "return_tokens": True}
    with http.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert "[DONE]" not in events  # llama.cpp's /completion stream ends with the stop object
    *pieces, final = events
    assert all(p["stop"] is False for p in pieces) and final["stop"] is True
    text = "".join(p["content"] for p in pieces) + final["content"]
    assert text == greedy(model, PROMPT, 16)
    assert final["tokens_predicted"] == 16 and final["stop_type"] == "limit" and "timings" in final
    assert [t for p in pieces for t in p["tokens"]] == final["tokens"]


def test_infill_continue_style(http: httpx.Client, model: Model) -> None:
    """A Continue-style FIM request: streaming, plain prefix and suffix, reading `content`."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "", "n_predict": 16, "temperature": 0}
    with http.stream("POST", "/infill", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        text = "".join(e["content"] for e in sse_events(r.iter_lines()))
    assert text == greedy(model, model.infill_ids(PREFIX, SUFFIX), 16)
    j = http.post("/infill", json=body).json()
    assert j["content"] == text and j["tokens_evaluated"] == len(model.infill_ids(PREFIX, SUFFIX))


def test_infill_with_input_extra(http: httpx.Client, model: Model) -> None:
    extra = [{"filename": "util.py", "text": "def helper():\n    return 1\n"}]
    body = {
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": extra,
        "prompt": "c = ",
        "n_predict": 12,
        "temperature": 0,
    }
    j = http.post("/infill", json=body).json()
    ids = model.infill_ids(PREFIX, SUFFIX, extra_files=[("util.py", extra[0]["text"])], middle_prompt="c = ")
    assert ids[0] == model.tokenizer.fim_ids["repo"]  # the repository-level form
    assert j["tokens_evaluated"] == len(ids)
    assert j["content"] == greedy(model, ids, 12)


def test_tabby_style_fim_template(http: httpx.Client, model: Model) -> None:
    """Tabby's `llama.cpp/completion` backend: a FIM prompt template, special tokens parsed."""
    prompt = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    tokens = http.post("/tokenize", json={"content": prompt}).json()["tokens"]
    assert tokens == model.infill_ids(PREFIX, SUFFIX)
    j = http.post("/completion", json={"prompt": prompt, "n_predict": 16, "temperature": 0, "stream": False}).json()
    assert j["content"] == greedy(model, model.infill_ids(PREFIX, SUFFIX), 16)


def test_tokenize_detokenize(http: httpx.Client, model: Model) -> None:
    text = "def héllo():\n    return 'wörld'"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == model.tokenize(text)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces) == (
        text.encode()
    )
    plain = http.post("/tokenize", json={"content": "<fim_prefix>", "parse_special": False}).json()["tokens"]
    assert plain != [model.tokenizer.fim_ids["prefix"]]
    assert http.post("/detokenize", json={}).json() == {"content": ""}


def test_props_and_slots(http: httpx.Client, model_file: Path) -> None:
    props = http.get("/props").json()
    assert props["n_ctx"] == N_CTX and props["total_slots"] == 4
    assert props["model_path"] == str(model_file)
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == N_CTX and settings["params"]["temperature"] == 0.8 and settings["params"]["top_k"] == 40
    slots = http.get("/slots").json()
    assert len(slots) == 4 and all(s["n_ctx"] == N_CTX for s in slots)


def test_time_limit(http: httpx.Client) -> None:
    """llama.cpp's t_max_predict_ms (the server's --timeout works the same way): the request ends
    as if it reached n_predict."""
    t0 = time.monotonic()
    j = http.post(
        "/completion", json={"prompt": LONG_PROMPT, "n_predict": -1, "temperature": 0, "t_max_predict_ms": 300}
    ).json()
    assert time.monotonic() - t0 < 5
    assert j["stop_type"] == "limit" and 0 < j["tokens_predicted"] < N_CTX - 10


# --- bad input ---------------------------------------------------------------------------------


BAD_REQUESTS: list[tuple[str, str, bytes | dict[str, Any] | None, int, str | None]] = [
    # (method, path, body, status, error code or param)
    ("POST", "/v1/completions", b'{"prompt": "x",', 400, "invalid_json"),
    ("POST", "/v1/completions", b"", 400, "invalid_json"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "invalid_utf8"),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', 400, None),
    ("POST", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "1 " * (N_CTX + 10)}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": [1, 2], "suffix": "x"}, 400, "prompt"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ("POST", "/completion", {"prompt": "x", "n_predict": -2}, 400, "n_predict"),
    ("POST", "/completion", {"prompt": [[1, 2]]}, 400, "prompt"),
    ("POST", "/completion", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("POST", "/completion", {"prompt": "x", "repeat_penalty": 0}, 400, "repeat_penalty"),
    ("POST", "/completion", {"prompt": "x", "n_probs": 1000}, 400, "n_probs"),
    ("POST", "/infill", {"input_extra": [{"filename": 3}]}, 400, "input_extra"),
    ("POST", "/tokenize", {"content": None}, 400, "content"),
    ("POST", "/detokenize", {"tokens": [0, 4099]}, 400, "tokens"),
    ("POST", "/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("GET", "/v1/completions", None, 405, None),
    ("GET", "/no/such/endpoint", None, 404, None),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "expect"), BAD_REQUESTS)
def test_bad_input(
    http: httpx.Client,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None,
    status: int,
    expect: str | None,
) -> None:
    if isinstance(body, dict):
        r = http.request(method, path, json=body)
    else:
        r = http.request(method, path, content=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status in (400, 405) else "not_found_error")
    if expect is not None:
        assert expect in (err["code"], err["param"]), err


def test_oversized_body(http: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (8 << 20) + b'"}'
    r = http.post("/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_form_encoded_json_is_accepted(http: httpx.Client) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; llama.cpp reads it as JSON anyway."""
    r = http.post(
        "/tokenize", content=b'{"content": "x"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200 and r.json()["tokens"]


def test_still_serving_after_bad_input(oai: openai.OpenAI, http: httpx.Client, model: Model) -> None:
    for _, path, body, _, _ in BAD_REQUESTS[:8]:
        http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert http.get("/health").json() == {"status": "ok"}
    r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy(model, PROMPT, 8)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="m", prompt="x", max_tokens=10**9)
    assert e.value.code == "context_length_exceeded"


# --- metrics, disconnects ----------------------------------------------------------------------


def test_metrics(http: httpx.Client, oai: openai.OpenAI, model_file: Path) -> None:
    oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    http.post("/completion", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0, "stream": True})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "llmctl_requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert metric(text, "llmctl_requests_total", '{endpoint="/v1/completions",status="400"}') >= 1
    assert metric(text, "llmctl_requests_total", '{endpoint="/completion",status="200"}') >= 1
    assert metric(text, "llmctl_prompt_tokens_total") > 0
    assert metric(text, "llmctl_generated_tokens_total") >= 16
    assert metric(text, "llmctl_time_to_first_token_seconds_count") >= 2
    assert metric(text, "llmctl_time_per_output_token_seconds_count") >= 14
    assert metric(text, "llmctl_generations_total", '{reason="length"}') >= 2
    assert metric(text, "llmctl_slots") == 4 and metric(text, "llmctl_model_loaded") == 1
    # the Q8_0 matrices this CPU's kernels repack (none without AVX-512), all of them in the end
    with read_gguf(model_file) as f:
        to_repack = sum(repackable(t) and t.ggml_type in types_to_repack(None) for t in f.tensors.values())
    assert metric(text, "llmctl_matrices_to_repack") == to_repack
    assert until(lambda: metric(http.get("/metrics").text, "llmctl_matrices_repacked") == to_repack, 60, every=0.05)
    for name in ("llmctl_queue_depth", "llmctl_busy_slots", "llmctl_prompt_tokens_cached_total"):
        assert re.search(rf"^{name} ", text, re.M), name


def test_streaming_disconnect_frees_the_slot(server: Server) -> None:
    before = metric(httpx.get(f"{server.url}/metrics").text, "llmctl_generations_total", '{reason="cancelled"}')
    body = {"prompt": LONG_PROMPT, "n_predict": -1, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert busy_slots(server.url) >= 1
    # the connection is closed: the generation (thousands of tokens to go) must be cancelled
    wait_for(lambda: busy_slots(server.url) == 0, 5, "the slot to be freed")
    after = metric(httpx.get(f"{server.url}/metrics").text, "llmctl_generations_total", '{reason="cancelled"}')
    assert after == before + 1


def test_non_streaming_disconnect_frees_the_slot(server: Server) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": N_CTX - 100, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_for(lambda: busy_slots(server.url) == 0, 5, "the slot to be freed")

    def answered_499() -> bool:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "llmctl_requests_total", '{endpoint="/v1/completions",status="499"}') >= 1

    wait_for(answered_499, 5, "the request to be counted as closed by the client (499)")


# --- servers of their own: API key, queue full, SIGTERM, loading -------------------------------


def test_api_key(model_file: Path, tmp_path: Path) -> None:
    key = "s3cret-key"
    args = ("--alias", "coder", "--timeout", "0.5")
    with running(model_file, tmp_path / "log", *args, env={"LLMCTL_API_KEY": key}) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200  # open: for probes
        for method, path in [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/completion"), ("GET", "/props")]:
            r = httpx.request(method, f"{s.url}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(f"{s.url}/completion", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["coder"]
        r = client.completions.create(model="coder", prompt=PROMPT, max_tokens=4, temperature=0)
        assert r.model == "coder" and r.usage is not None and r.usage.completion_tokens == 4
        # --timeout 0.5: a request that would run for thousands of tokens ends early, as "length"
        long = client.completions.create(model="coder", prompt=LONG_PROMPT, max_tokens=N_CTX - 100, temperature=0)
        assert long.choices[0].finish_reason == "length"
        assert long.usage is not None and 0 < long.usage.completion_tokens < N_CTX - 100
        ok = httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and metric(ok.text, "llmctl_requests_total", '{endpoint="/metrics",status="401"}')
        assert key not in s.output()


def test_queue_full_answers_429(model_file: Path, tmp_path: Path) -> None:
    with running(model_file, tmp_path / "log", "--parallel", "1", "--max-queue", "1") as s:
        body = {"prompt": LONG_PROMPT, "n_predict": -1, "temperature": 0, "stream": True}
        with contextlib.ExitStack() as streams:
            running_ = streams.enter_context(httpx.stream("POST", f"{s.url}/completion", json=body, timeout=30))
            assert running_.status_code == 200
            wait_for(lambda: busy_slots(s.url) == 1, 5, "the slot to be busy")
            queued = streams.enter_context(httpx.stream("POST", f"{s.url}/completion", json=body, timeout=30))
            assert queued.status_code == 200
            wait_for(lambda: metric(httpx.get(f"{s.url}/metrics").text, "llmctl_queue_depth") == 1, 5, "a queue")
            for _ in range(3):
                r = httpx.post(f"{s.url}/completion", json={"prompt": "x", "n_predict": 4})
                assert r.status_code == 429
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0).completions.create(
                    model="m", prompt="x", max_tokens=2
                )
        # both connections closed: both requests cancelled, the server idle and serving again
        wait_for(lambda: busy_slots(s.url) == 0, 5, "the slot to be freed")
        r = httpx.post(f"{s.url}/completion", json={"prompt": "x", "n_predict": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] >= 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_file: Path, tmp_path: Path) -> None:
    shutdown_timeout = 2.0
    s = Server(model_file, tmp_path / "log", "--shutdown-timeout", str(shutdown_timeout))
    try:
        s.wait_ready()
        events: list[Any] = []
        body = {"prompt": LONG_PROMPT, "n_predict": -1, "temperature": 0, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", f"{s.url}/completion", json=body, timeout=30) as r:
                events.extend(sse_events(r.iter_lines()))

        reader = threading.Thread(target=stream)
        reader.start()
        wait_for(lambda: busy_slots(s.url) == 1, 5, "the request to run")
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(timeout=shutdown_timeout + 10)
        elapsed = time.monotonic() - t0
        reader.join(timeout=10)
        assert code == 0, s.output()
        assert elapsed < shutdown_timeout + 5, elapsed
        # the client got a well-formed end: tokens, then an error event saying the server is stopping
        assert len(events) > 1 and events[-1]["error"]["code"] == "shutting_down"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health")
    finally:
        s.stop()


def test_sigterm_when_idle_exits_0_quickly(model_file: Path, tmp_path: Path) -> None:
    s = Server(model_file, tmp_path / "log")
    try:
        s.wait_ready()
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 3
    finally:
        s.stop()


def test_missing_model_file_fails_fast(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "runtime", "serve", "-m", str(tmp_path / "nope.gguf"), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "nope.gguf" in p.stderr


def test_health_while_loading_and_load_failure(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: /health is 503 "loading" until the background load finishes; a failed load
    answers 500 and calls on_fatal (the CLI then exits 1)."""
    from runtime.server import state as state_module
    from runtime.server.app import create_app

    release = threading.Event()
    real_open = Model.open

    def slow_open(f: Any, **kw: Any) -> Model:
        release.wait(10)
        if "broken" in str(f.path):
            raise ModelError(f"{f.path}: truncated file")
        return real_open(f, **kw)

    monkeypatch.setattr(state_module.Model, "open", slow_open)

    async def scenario(path: Path) -> list[tuple[int, Any]]:
        fatal: list[bool] = []
        app = create_app(path, n_parallel=1, n_threads=1, on_fatal=lambda: fatal.append(True))
        seen = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                r = await c.get("/health")
                seen.append((r.status_code, r.json()))
                r = await c.post("/completion", json={"prompt": "x"})
                seen.append((r.status_code, r.json()["error"]["code"]))
                release.set()
                for _ in range(200):
                    r = await c.get("/health")
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(0.02)
                seen.append((r.status_code, r.json()))
        seen.append((0, fatal))
        release.clear()
        return seen

    ok = asyncio.run(scenario(model_file))
    assert ok == [(503, {"status": "loading"}), (503, "model_loading"), (200, {"status": "ok"}), (0, [])]
    broken = tmp_path / "broken.gguf"  # a valid header: the load fails after it
    shutil.copyfile(model_file, broken)
    bad = asyncio.run(scenario(broken))
    assert bad[0] == (503, {"status": "loading"})
    assert bad[2][0] == 500 and bad[2][1]["status"] == "error" and "truncated" in bad[2][1]["error"]
    assert bad[3] == (0, [True])


def test_model_load_checks_the_header_before_the_rest(model_file: Path, tmp_path: Path) -> None:
    """ModelLoad parses the file once: wait_checked answers as soon as the header is checked (what
    `serve` waits for before binding its port), None for a model, the one-line error for a file
    that is none; the load then ends with the model, or with that same error."""
    from runtime.server.loading import ModelLoad

    ended = threading.Event()
    good = ModelLoad(model_file, n_threads=1, n_ctx=64)
    good.when_ended(lambda _: ended.set())
    assert good.wait_checked() is None
    assert ended.wait(60) and good.model is not None and good.error is None
    good.model.close()

    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_bytes(b"GGUF" + bytes(60))
    bad = ModelLoad(not_a_model, n_threads=1)
    error = bad.wait_checked()
    assert error is not None and error.startswith(f"{not_a_model}: ") and "\n" not in error
    ended.clear()
    bad.when_ended(lambda _: ended.set())
    assert ended.wait(60) and bad.model is None and bad.error == error


def test_a_scheduler_that_cannot_start_is_a_load_failure(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model loads but its slots cannot be set up (no memory for their caches): /health answers
    500 naming the error and on_fatal is called, instead of "loading" forever."""
    from runtime.server.app import create_app
    from runtime.server.state import ServerState

    def no_memory(self: ServerState, model: Model) -> Any:
        raise MemoryError("cannot allocate the KV caches")

    monkeypatch.setattr(ServerState, "_scheduler_for", no_memory)

    async def scenario() -> tuple[int, Any, list[bool]]:
        fatal: list[bool] = []
        app = create_app(model_file, n_parallel=1, n_threads=1, on_fatal=lambda: fatal.append(True))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for _ in range(500):
                    r = await c.get("/health")
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(0.02)
        return r.status_code, r.json(), fatal

    status, body, fatal = asyncio.run(scenario())
    assert status == 500 and body == {"status": "error", "error": "MemoryError: cannot allocate the KV caches"}
    assert fatal == [True]


# --- load ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_8_clients_30_seconds(server: Server, model: Model) -> None:
    """8 concurrent clients, mixed streaming / non-streaming, OpenAI / llama.cpp requests, for 30 s:
    no errors, and every output equals the greedy output of the same prompt computed alone."""
    prompts = [
        "def fib(n):",
        "def fib(n):\n    if n < 2:",
        "import os\nimport sys\n",
        "import os\nimport json\n",
        "class Stack:\n    def __init__(self):",
        "# utilities\n" * 8 + "def helper(x):",
        "for i in range(10):\n",
        "SELECT * FROM",
    ]
    lengths = (8, 24, 48)
    expected = {(p, n): greedy(model, p, n) for p in prompts for n in lengths}
    duration = 30.0
    stop_at = time.monotonic() + duration
    errors: list[str] = []
    counts = [0] * 8

    def client(i: int) -> None:
        rng = random.Random(i)
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while time.monotonic() < stop_at:
                prompt, n = rng.choice(prompts), rng.choice(lengths)
                kind = rng.randrange(4)
                try:
                    if kind == 0:
                        text = oai.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0)
                        got = text.choices[0].text
                    elif kind == 1:
                        stream = oai.completions.create(
                            model="m", prompt=prompt, max_tokens=n, temperature=0, stream=True
                        )
                        got = "".join(c.choices[0].text for c in stream if c.choices)
                    elif kind == 2:
                        r = http.post("/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0})
                        r.raise_for_status()
                        got = r.json()["content"]
                    else:
                        body = {"prompt": prompt, "n_predict": n, "temperature": 0, "stream": True}
                        with http.stream("POST", "/completion", json=body) as r:
                            r.raise_for_status()
                            got = "".join(e["content"] for e in sse_events(r.iter_lines()))
                except Exception as e:  # noqa: BLE001 (collected and reported below)
                    errors.append(f"client {i} kind {kind}: {type(e).__name__}: {e}")
                    continue
                if got != expected[(prompt, n)]:
                    errors.append(f"client {i} kind {kind} {prompt!r} n={n}: {got!r} != {expected[(prompt, n)]!r}")
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 120)
    assert not errors, errors[:5]
    assert all(c > 0 for c in counts), counts
    assert sum(counts) >= 40, counts
    assert busy_slots(server.url) == 0


def test_server_imports_neither_fastapi_nor_pydantic() -> None:
    """The first request waits for the server's imports: FastAPI and pydantic were more than half of
    them (docs/server.md). Both are installed here (the openai client needs pydantic), so an import
    that comes back shows."""
    probe = "import sys, runtime.server.serve; print(sorted(m for m in ('fastapi', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
