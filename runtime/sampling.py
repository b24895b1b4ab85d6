"""Choosing the next token from logits: repetition penalty, top-k, top-p, min-p, temperature.

The order follows llama.cpp's default sampler chain (penalties, top-k, top-p, min-p,
temperature, then a draw); temperature <= 0 means greedy. A seed makes draws reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy (argmax)
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off; > 1 discourages the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (self.seed is None or self.seed >= 0, "seed must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(f"invalid sampling parameter: {message}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if not np.isfinite(logits).all():
            # -inf masks a token; NaN, +inf or nothing left would crash or silently pick garbage
            if np.isnan(logits).any() or np.isposinf(logits).any() or np.isneginf(logits).all():
                raise GenerationError(
                    "the model computed non-finite logits (NaN or infinity); its weights are probably corrupt"
                )
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and history:
            recent = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        # candidates sorted by logit, best first (stable: ties keep the lower id first)
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[: p.top_k]
        cand = logits[order].astype(np.float64)
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep_mask = probs >= p.min_p * probs[0]
            order, cand = order[keep_mask], cand[keep_mask]
        scaled = (cand - cand[0]) / p.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])
