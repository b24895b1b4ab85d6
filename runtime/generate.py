"""Prefill, decode and stop handling: the generation loop behind Model.generate / Model.infill."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ContextOverflowError
from runtime.kv_cache import KVCache
from runtime.model import Transformer
from runtime.sampling import Sampler
from runtime.tokenizer import CodeTokenizer

PREFILL_BATCH = 512  # prompt tokens per forward call: bounds activation memory on long prompts


@dataclass
class Completion:
    """What a finished generation produced; `finish_reason` is "stop" (EOS or a stop string)
    or "length" (max_tokens or the context window reached)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None


def prefill(model: Transformer, cache: KVCache, ids: Sequence[int]) -> np.ndarray:
    """Run the prompt through the model in batches; returns the last position's logits [V]."""
    logits = None
    for start in range(0, len(ids), PREFILL_BATCH):
        chunk = np.asarray(ids[start : start + PREFILL_BATCH], dtype=np.int64)
        logits = model.forward(chunk, cache)
    assert logits is not None
    return logits[-1]


def decode_one(model: Transformer, cache: KVCache, token: int) -> np.ndarray:
    return model.forward(np.asarray([token], dtype=np.int64), cache)[-1]


class StopMatcher:
    """Releases text only once it can no longer be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    model: Transformer,
    cache: KVCache,
    tokenizer: CodeTokenizer,
    prompt_ids: Sequence[int],
    sampler: Sampler,
    *,
    max_tokens: int | None,
    stop: Sequence[str] = (),
    result: Completion | None = None,
) -> Iterator[str]:
    """Yield text pieces of the continuation of `prompt_ids` (a fresh context).

    max_tokens=None generates until EOS or the context window is full. `result`, when given,
    is filled in as generation goes (tokens, text, finish_reason)."""
    res = result if result is not None else Completion()
    n_ctx = cache.n_ctx
    if not prompt_ids:
        raise ContextOverflowError("the prompt is empty: give at least one token of text")
    if len(prompt_ids) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt has {len(prompt_ids)} tokens but the context window holds {n_ctx}; "
            "shorten the prompt or load the model with a larger n_ctx"
        )
    if max_tokens is not None and len(prompt_ids) + max_tokens > n_ctx:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context window "
            f"of {n_ctx} tokens; lower max_tokens or load the model with a larger n_ctx"
        )
    budget = n_ctx - len(prompt_ids) if max_tokens is None else max_tokens
    res.prompt_tokens = len(prompt_ids)
    cache.reset()
    history = list(prompt_ids)
    detok = tokenizer.stream_decoder()
    stops = StopMatcher(stop)
    if budget <= 0:
        res.finish_reason = "length"
        return
    logits = prefill(model, cache, prompt_ids)
    while True:
        token = sampler(logits, history)
        if token in tokenizer.eog_ids:
            res.finish_reason = "stop"
            break
        res.tokens.append(token)
        history.append(token)
        text, hit = stops.feed(detok.push(token))
        if text:
            res.text += text
            yield text
        if hit:
            res.finish_reason = "stop"
            return
        if len(res.tokens) >= budget:
            res.finish_reason = "length"
            break
        logits = decode_one(model, cache, token)
    tail, hit = stops.feed(detok.flush())
    tail += "" if hit else stops.flush()
    if tail:
        res.text += tail
        yield tail
