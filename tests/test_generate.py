"""Generation: determinism, seeds, max_tokens, stop strings, end of text, context limits, FIM prompts, eval."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from runtime import Completion, Model
from runtime.errors import ContextOverflowError, GenerationError
from runtime.generate import generate
from runtime.sampling import Sampler, SamplingParams
from runtime.testing.make_model import make_model

PROMPT = "def fib(n):"
GREEDY = {"temperature": 0.0}
# Sampling over the whole distribution, so that different seeds take different paths.
WIDE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen")
    return {arch: make_model(d / f"{arch}.gguf", arch=arch) for arch in ("starcoder2", "starcoder")}


@pytest.fixture(scope="module", params=["starcoder2", "starcoder"])
def model(request: pytest.FixtureRequest, paths: dict[str, Path]) -> Iterator[Model]:
    with Model.load(paths[request.param], n_threads=2, n_ctx=256) as m:
        yield m


@pytest.fixture(scope="module")
def m2(paths: dict[str, Path]) -> Iterator[Model]:
    """The starcoder2 model alone, for tests that need no second architecture."""
    with Model.load(paths["starcoder2"], n_threads=2, n_ctx=256) as m:
        yield m


def run(m: Model, prompt: str | Sequence[int], **kw: object) -> tuple[list[str], Completion]:
    res = Completion()
    pieces = list(m.generate(prompt, result=res, **kw))  # type: ignore[arg-type]
    assert "".join(pieces) == res.text
    return pieces, res


# --- determinism and seeds ---------------------------------------------------------------------


def test_greedy_is_deterministic(model: Model, paths: dict[str, Path]) -> None:
    a = model.complete(PROMPT, max_tokens=24, **GREEDY)
    b = model.complete(PROMPT, max_tokens=24, seed=123, **GREEDY)
    assert a.tokens == b.tokens and a.text == b.text and len(a.tokens) == 24
    with Model.load(paths[model.config.arch], n_threads=1, n_ctx=64) as other:
        assert other.complete(PROMPT, max_tokens=24, **GREEDY).tokens == a.tokens


def test_greedy_follows_the_argmax_of_eval(model: Model) -> None:
    """Each greedy token is the argmax of a fresh full evaluation of everything before it: the
    KV-cached decoding gives the same choices as recomputing from scratch."""
    ids = model.tokenize(PROMPT)
    out = model.complete(ids, max_tokens=12, **GREEDY)
    for i, tok in enumerate(out.tokens):
        assert int(np.argmax(model.eval(ids + out.tokens[:i])[-1])) == tok, i


def test_same_seed_same_text_different_seeds_differ(model: Model) -> None:
    runs = {seed: model.complete(PROMPT, max_tokens=24, seed=seed, **WIDE) for seed in (1, 2, 3)}
    assert model.complete(PROMPT, max_tokens=24, seed=1, **WIDE).tokens == runs[1].tokens
    assert len({tuple(r.tokens) for r in runs.values()}) == 3
    greedy = model.complete(PROMPT, max_tokens=24, **GREEDY).tokens
    assert any(r.tokens != greedy for r in runs.values())
    # the default sampler (top-k 40, top-p 0.95, min-p 0.05) is reproducible too
    assert model.complete(PROMPT, max_tokens=16, seed=7).tokens == model.complete(PROMPT, max_tokens=16, seed=7).tokens


# --- max_tokens and stop strings ---------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 30])
def test_max_tokens(model: Model, n: int) -> None:
    pieces, res = run(model, PROMPT, max_tokens=n, **GREEDY)
    assert len(res.tokens) == n and res.finish_reason == "length"
    assert res.prompt_tokens == len(model.tokenize(PROMPT))
    assert res.text == model.detokenize(res.tokens)
    assert (pieces == []) == (n == 0)


def _token_texts(m: Model, tokens: list[int]) -> list[str]:
    """The text each token adds (a character split over tokens belongs to the one completing it)."""
    dec = m.tokenizer.stream_decoder()
    texts = [dec.push(t) for t in tokens]
    texts[-1] += dec.flush()
    return texts


def test_stop_string_split_across_tokens(model: Model) -> None:
    full = model.complete(PROMPT, max_tokens=40, **GREEDY)
    texts = _token_texts(model, full.tokens)
    starts = np.cumsum([0] + [len(t) for t in texts])
    assert "".join(texts) == full.text
    # a stop string made of the end of token k and the start of token k+1
    for k in range(3, len(texts) - 1):
        a, b = texts[k], texts[k + 1]
        if len(a) >= 2 and len(b) >= 2 and (a + b).isascii() and a.strip() and b.strip():
            stop = a[-2:] + b[:2]
            cut = int(starts[k + 1]) - 2
            if full.text.find(stop) == cut:
                break
    else:
        pytest.fail(f"no token boundary to test in {texts}")
    pieces, res = run(model, PROMPT, max_tokens=40, stop=[stop], **GREEDY)
    assert res.finish_reason == "stop"
    assert res.text == full.text[:cut] and stop not in res.text
    assert res.tokens == full.tokens[: k + 2]  # generation ended on the token that completed it
    assert stop not in "".join(pieces)
    # with a second, later stop string the earlier one still wins; order in the list does not matter
    later = texts[-1]
    _, res2 = run(model, PROMPT, max_tokens=40, stop=[later, "@@never@@", stop], **GREEDY)
    assert res2.text == res.text and res2.finish_reason == "stop"


def test_stop_string_in_the_first_token(model: Model) -> None:
    first = model.complete(PROMPT, max_tokens=1, **GREEDY).text
    pieces, res = run(model, PROMPT, max_tokens=20, stop=[first[:1]], **GREEDY)
    assert res.text == "" and pieces == [] and res.finish_reason == "stop" and len(res.tokens) == 1


def test_held_back_text_is_released_at_the_end(model: Model) -> None:
    """Text that could be the start of a stop string is held back, and flushed when generation
    ends without the stop string appearing."""
    full = model.complete(PROMPT, max_tokens=10, **GREEDY)
    last = model.detokenize(full.tokens[-1:])
    pieces, res = run(model, PROMPT, max_tokens=10, stop=[last + "\x00never"], **GREEDY)
    assert res.text == full.text and res.finish_reason == "length"
    pieces, res = run(model, PROMPT, max_tokens=10, stop=["@@@"], **GREEDY)
    assert res.text == full.text and res.finish_reason == "length"


# --- end of text -------------------------------------------------------------------------------


class StopAt(Sampler):
    """Greedy over the tokens that do not end generation, except at call `step`: returns `token`."""

    def __init__(self, token: int, step: int, avoid: frozenset[int]) -> None:
        super().__init__(SamplingParams(temperature=0.0))
        self.token, self.step, self.avoid, self.calls = token, step, sorted(avoid), 0

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        self.calls += 1
        if self.calls == self.step:
            return self.token
        logits = logits.copy()
        logits[self.avoid] = -np.inf
        return super().__call__(logits, history)


@pytest.mark.parametrize("role", ["eos", "pad", "repo", "sep"])
def test_end_of_generation_tokens_stop(m2: Model, role: str) -> None:
    tok = m2.tokenizer
    token = tok.eos_id if role == "eos" else tok.fim_ids[role]
    assert token in tok.eog_ids
    res = Completion()
    sampler = StopAt(token, 3, tok.eog_ids)
    pieces = list(generate(m2.transformer, m2.cache, tok, m2.tokenize(PROMPT), sampler, max_tokens=10, result=res))
    assert sampler.calls == 3
    assert len(res.tokens) == 2 and token not in res.tokens
    assert res.finish_reason == "stop"
    assert "".join(pieces) == res.text == m2.detokenize(res.tokens)


def test_other_control_tokens_do_not_stop(m2: Model) -> None:
    fim_prefix = m2.tokenizer.fim_ids["prefix"]
    assert fim_prefix not in m2.tokenizer.eog_ids
    res = Completion()
    sampler = StopAt(fim_prefix, 3, m2.tokenizer.eog_ids)
    text = "".join(generate(m2.transformer, m2.cache, m2.tokenizer, [100, 200], sampler, max_tokens=6, result=res))
    assert res.tokens[2] == fim_prefix and len(res.tokens) == 6 and res.finish_reason == "length"
    assert "<fim_prefix>" in text


# --- context window ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ctx(paths: dict[str, Path]) -> Iterator[Model]:
    with Model.load(paths["starcoder2"], n_threads=1, n_ctx=16) as m:
        yield m


def test_prompt_longer_than_the_context(small_ctx: Model) -> None:
    for n in (17, 16):
        with pytest.raises(ContextOverflowError, match=f"the prompt has {n} tokens but the context window holds 16"):
            small_ctx.complete([100] * n, max_tokens=1)
    with pytest.raises(ContextOverflowError, match="17 tokens do not fit the context window of 16"):
        small_ctx.eval([100] * 17)


def test_prompt_plus_max_tokens_too_long(small_ctx: Model) -> None:
    with pytest.raises(ContextOverflowError, match=r"prompt \(10 tokens\) \+ max_tokens \(7\) exceeds .* of 16 tokens"):
        small_ctx.complete([100] * 10, max_tokens=7)
    assert len(small_ctx.complete([100] * 10, max_tokens=6, **GREEDY).tokens) == 6


def test_unlimited_generation_fills_the_context(small_ctx: Model) -> None:
    res = small_ctx.complete([100] * 10, max_tokens=None, **GREEDY)
    assert len(res.tokens) == 6 and res.finish_reason == "length"


def test_empty_prompt(small_ctx: Model) -> None:
    with pytest.raises(ContextOverflowError, match="the prompt is empty"):
        small_ctx.complete("", max_tokens=1)


def test_starcoder_context_is_limited_by_its_positions(paths: dict[str, Path]) -> None:
    with pytest.raises(ContextOverflowError, match="exceeds the 512 learned positions"):
        Model.load(paths["starcoder"], n_ctx=513)
    with Model.load(paths["starcoder2"], n_ctx=2048) as m:  # RoPE: any length
        assert m.n_ctx == 2048


# --- invalid parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.01}, r"min_p must be in \[0, 1\]"),
        ({"repeat_penalty": 0.0}, "repeat_penalty must be > 0"),
        ({"repeat_last_n": -1}, "repeat_last_n must be >= 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ],
)
def test_invalid_sampling_parameters(m2: Model, kw: dict[str, float], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        m2.generate(PROMPT, **kw)  # type: ignore[arg-type]  # raised at the call, before iterating


def test_invalid_token_ids_and_load_options(m2: Model, paths: dict[str, Path]) -> None:
    with pytest.raises(GenerationError, match="token id 1000 is outside the vocabulary"):
        m2.generate([5, 1000])
    with pytest.raises(GenerationError, match="token id -1"):
        m2.detokenize([-1])
    with pytest.raises(GenerationError, match="n_threads must be at least 1"):
        Model.load(paths["starcoder2"], n_threads=0)
    with pytest.raises(GenerationError, match="n_ctx must be at least 1"):
        Model.load(paths["starcoder2"], n_ctx=0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [np.nan, np.inf, "all -inf"])
def test_non_finite_logits_are_an_error(temperature: float, bad: object) -> None:
    """NaN logits (broken weights) used to make the sampler raise IndexError, or pick token 0."""
    logits = np.zeros(50, np.float32)
    if bad == "all -inf":
        logits[:] = -np.inf
    else:
        logits[7] = bad  # type: ignore[call-overload]
    with pytest.raises(GenerationError, match="non-finite logits"):
        Sampler(SamplingParams(temperature=temperature, seed=0))(logits, [])


def test_masked_tokens_are_never_sampled() -> None:
    logits = np.linspace(0, 3, 50).astype(np.float32)
    logits[40:] = -np.inf
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    draws = {s(logits, []) for _ in range(300)}
    assert max(draws) < 40 and len(draws) > 10


# --- fill in the middle ------------------------------------------------------------------------

PREFIX = "def area(r):\n    <fim_middle>"  # control-token text in user code stays text
SUFFIX = "\n    return result\n"


def test_infill_prompt_layout(m2: Model) -> None:
    fim, enc = m2.tokenizer.fim_ids, m2.tokenizer.encode
    assert (fim["prefix"], fim["suffix"], fim["middle"]) == (1, 3, 2)
    ids = m2.infill_ids(PREFIX, SUFFIX)
    assert ids == [1, *enc(PREFIX, special=False), 3, *enc(SUFFIX, special=False), 2]
    assert ids.count(2) == 1  # the "<fim_middle>" typed in the prefix is not the control token
    assert m2.detokenize(ids) == f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"


def test_repo_level_infill_prompt_matches_llama_cpp_server(m2: Model) -> None:
    """llama.cpp server's format_infill: [repo]myproject\\n, then per extra file [sep]{name}\\n and
    its text, each tokenized on its own, then [sep]{filename}\\n and the plain FIM prompt."""
    fim = m2.tokenizer.fim_ids

    def enc(text: str) -> list[int]:
        return m2.tokenizer.encode(text, special=False)

    extra = [("utils.py", "    def helper():\n        return 1\n"), ("b.py", "\nx = 2\n")]
    ids = m2.infill_ids(PREFIX, SUFFIX, repo_name="myrepo", extra_files=extra, filename="main.py")
    expect = [fim["repo"], *enc("myrepo\n")]
    for name, text in extra:
        expect += [fim["sep"], *enc(f"{name}\n"), *enc(text)]
    expect += [fim["sep"], *enc("main.py\n"), fim["prefix"], *enc(PREFIX), fim["suffix"], *enc(SUFFIX), fim["middle"]]
    assert ids == expect
    assert m2.detokenize(ids) == (
        "<repo_name>myrepo\n<file_sep>utils.py\n    def helper():\n        return 1\n<file_sep>b.py\n\nx = 2\n"
        f"<file_sep>main.py\n<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    )
    # the server's defaults for the project and the current file's name
    default = m2.infill_ids(PREFIX, SUFFIX, extra_files=extra[:1])
    assert default[: len(enc("myproject\n")) + 1] == [fim["repo"], *enc("myproject\n")]
    assert m2.detokenize(default).count("<file_sep>filename\n<fim_prefix>") == 1


def test_infill_generates_the_middle(model: Model) -> None:
    text = "".join(model.infill(PREFIX, SUFFIX, max_tokens=8, **GREEDY))  # type: ignore[arg-type]
    same = model.complete(model.infill_ids(PREFIX, SUFFIX), max_tokens=8, **GREEDY)
    assert isinstance(text, str) and text == same.text
    assert same.tokens and same.prompt_tokens == len(model.infill_ids(PREFIX, SUFFIX))


# --- eval --------------------------------------------------------------------------------------


class Recorder(Sampler):
    """Greedy, and keeps a copy of the logits it was given at every step."""

    def __init__(self) -> None:
        super().__init__(SamplingParams(temperature=0.0))
        self.seen: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        self.seen.append(logits.copy())
        return super().__call__(logits, history)


def test_eval_matches_generation_logits(model: Model) -> None:
    ids = model.tokenize(PROMPT)
    logits = model.eval(ids)
    assert logits.shape == (len(ids), model.config.n_vocab) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    rec, res = Recorder(), Completion()
    list(generate(model.transformer, model.cache, model.tokenizer, ids, rec, max_tokens=3, result=res))
    # prefill computes the head for the last row only: a 1-row matmul may sum in another order
    np.testing.assert_allclose(rec.seen[0], logits[-1], rtol=1e-5, atol=1e-5 * float(np.abs(logits[-1]).max()))
    # decoding one token with the cache ~ evaluating the whole sequence again
    for step in (1, 2):
        full = model.eval(ids + res.tokens[:step])[-1]
        np.testing.assert_allclose(rec.seen[step], full, rtol=1e-4, atol=1e-4 * float(np.abs(full).max()))


def test_eval_is_causal_across_batches(paths: dict[str, Path]) -> None:
    """Prompts longer than one 512-token batch: a position's logits depend only on what precedes it."""
    with Model.load(paths["starcoder2"], n_threads=2, n_ctx=640) as m:
        ids = (m.tokenize(Path(__file__).read_text()) * 3)[:600]
        assert len(ids) == 600
        logits = m.eval(ids)
        for n in (5, 512, 513, 600):
            part = m.eval(ids[:n])
            np.testing.assert_allclose(part[-1], logits[n - 1], rtol=1e-4, atol=1e-4)
        rec = Recorder()
        list(generate(m.transformer, m.cache, m.tokenizer, ids, rec, max_tokens=1))
        np.testing.assert_allclose(rec.seen[0], logits[-1], rtol=1e-5, atol=1e-5)
