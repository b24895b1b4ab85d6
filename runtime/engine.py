"""`Model`: the runtime's public Python API, used by the CLI, the server and the rest of llmctl."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from runtime.config import ModelConfig
from runtime.errors import ContextOverflowError, GenerationError, UnsupportedModelError
from runtime.generate import Completion, generate
from runtime.gguf import GGUFFile, read_gguf
from runtime.kv_cache import KVCache
from runtime.model import Transformer
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import CodeTokenizer

DEFAULT_N_CTX = 4096

__all__ = ["Completion", "Model"]


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Model:
    """A loaded StarCoder / StarCoder2 GGUF model with its tokenizer and a KV cache.

    One Model serves one generation at a time (it owns a single KV cache)."""

    def __init__(
        self,
        gguf: GGUFFile,
        cfg: ModelConfig,
        tokenizer: CodeTokenizer,
        n_ctx: int,
        n_threads: int,
        *,
        repack: bool | None = None,
    ) -> None:
        self.gguf = gguf
        self.config = cfg
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.transformer = Transformer(gguf, cfg, n_threads, repack=repack)
        try:
            self.cache = KVCache(cfg, n_ctx)
        except BaseException:
            self.transformer.close()
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        repack: bool | None = None,
    ) -> Model:
        """Map `path` and check it fully (metadata, every tensor's shape and type, tokenizer).
        n_ctx defaults to min(training context, 4096); n_threads to the usable CPUs. repack: copy
        the layers' Q4_0 and Q8_0 matrices into the kernels' repacked layouts where the CPU's
        kernel set has a tile for them (runtime/repack.py): None (default) or True does, False
        does not; the same results either way."""
        return cls.open(read_gguf(path, populate=True), n_threads=n_threads, n_ctx=n_ctx, repack=repack)

    @classmethod
    def open(
        cls,
        f: GGUFFile,
        *,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        repack: bool | None = None,
    ) -> Model:
        """`load` on a file already mapped and parsed; the Model takes it over (and closes it if
        the model cannot be built)."""
        try:
            cfg = ModelConfig.from_gguf(f)
            tokenizer = CodeTokenizer.from_gguf(f)
            if tokenizer.n_vocab != cfg.n_vocab:
                raise UnsupportedModelError(
                    f"{f.path}: tokenizer has {tokenizer.n_vocab} tokens but token_embd.weight has {cfg.n_vocab} rows"
                )
            ctx = n_ctx if n_ctx is not None else min(cfg.n_ctx_train, DEFAULT_N_CTX)
            if ctx < 1:
                raise GenerationError(f"n_ctx must be at least 1, got {ctx}")
            if cfg.arch == "starcoder" and ctx > cfg.n_ctx_train:
                raise ContextOverflowError(
                    f"{f.path}: n_ctx {ctx} exceeds the {cfg.n_ctx_train} learned positions of this starcoder model"
                )
            threads = n_threads if n_threads is not None else default_threads()
            if threads < 1:
                raise GenerationError(f"n_threads must be at least 1, got {threads}")
            return cls(f, cfg, tokenizer, ctx, threads, repack=repack)
        except BaseException:
            f.close()
            raise

    @property
    def path(self) -> Path:
        return self.gguf.path

    def wait_repacked(self, timeout: float | None = None) -> bool:
        """Wait until the matrices being repacked in the background (runtime/repack.py) all
        serve repacked, as benchmarks do before timing: True once they do (at once if there are
        none), False on timeout or if the repacking failed (`transformer.repacking.error`)."""
        repacking = self.transformer.repacking
        # complete before the thread has ended: a prompt pass repacked the rest (catch_up)
        return repacking is None or repacking.complete or (repacking.wait(timeout) and repacking.complete)

    def close(self) -> None:
        self.transformer.close()
        self.gguf.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokens ---

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; special=True parses control tokens such as <fim_prefix>."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.tokenizer.n_vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.n_vocab - 1})")
        return self.tokenizer.decode(ids)

    # --- evaluation ---

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Logits float32 [len(ids), n_vocab] at every position, from a fresh context."""
        ids = list(ids)
        if not ids:
            raise GenerationError("eval needs at least one token")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens do not fit the context window of {self.n_ctx}")
        self.detokenize(ids)  # validates the ids
        self.cache.reset()
        out = np.empty((len(ids), self.config.n_vocab), dtype=np.float32)
        step = 512
        for s in range(0, len(ids), step):
            chunk = np.asarray(ids[s : s + step], dtype=np.int64)
            out[s : s + len(chunk)] = self.transformer.forward(chunk, self.cache, all_logits=True)
        return out

    # --- generation ---

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: Sequence[str] = (),
        special: bool = True,
        result: Completion | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` (text, or token ids) piece by piece.

        Stops at EOS (or another end-of-generation token), at a stop string (not included in
        the output), after max_tokens (None: until the context is full). temperature 0 is
        greedy. Pass a Completion as `result` to get token ids and the finish reason."""
        if max_tokens is not None and max_tokens < 0:
            raise GenerationError(f"max_tokens must be >= 0, got {max_tokens}")
        ids = self.tokenize(prompt, special=special) if isinstance(prompt, str) else list(prompt)
        if ids:
            self.detokenize(ids)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed))
        return generate(
            self.transformer, self.cache, self.tokenizer, ids, sampler, max_tokens=max_tokens, stop=stop, result=result
        )

    def complete(self, prompt: str | Sequence[int], **kwargs: object) -> Completion:
        """Run generate() to the end and return the Completion."""
        res = Completion()
        for _ in self.generate(prompt, result=res, **kwargs):  # type: ignore[arg-type]
            pass
        return res

    def infill_ids(
        self,
        prefix: str,
        suffix: str,
        *,
        extra_files: Sequence[tuple[str, str]] = (),
        repo_name: str | None = None,
        filename: str | None = None,
        middle_prompt: str = "",
    ) -> list[int]:
        """Prompt tokens for fill-in-the-middle, prefix-suffix-middle order.

        Plain: <fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>. With repository context
        (repo_name, extra_files, filename) the repo-level form llama.cpp's server builds:
        <repo_name>{repo}\\n<file_sep>{name}\\n{text}...<file_sep>{filename}\\n<fim_prefix>..."""
        fim = self.tokenizer.fim_ids
        missing = [r for r in ("prefix", "suffix", "middle") if r not in fim]
        if missing:
            raise UnsupportedModelError(
                f"{self.path}: this model has no fill-in-the-middle tokens ({', '.join(missing)})"
            )
        enc = self.tokenizer.encode
        ids: list[int] = []
        if repo_name is not None or extra_files or filename is not None:
            if "repo" not in fim or "sep" not in fim:
                raise UnsupportedModelError(
                    f"{self.path}: this model has no <repo_name>/<file_sep> tokens for repo-level FIM"
                )
            # As llama.cpp's server (format_infill): each piece tokenized on its own, so a file's
            # text starts on a token boundary; its default project name is "myproject".
            ids += [fim["repo"], *enc(f"{repo_name or 'myproject'}\n", special=False)]
            for name, text in extra_files:
                ids += [fim["sep"], *enc(f"{name}\n", special=False), *enc(text, special=False)]
            ids += [fim["sep"], *enc(f"{filename or 'filename'}\n", special=False)]
        ids += [fim["prefix"], *enc(prefix, special=False), fim["suffix"], *enc(suffix, special=False), fim["middle"]]
        ids += enc(middle_prompt, special=False)
        if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
            ids.insert(0, self.tokenizer.bos_id)
        return ids

    def infill(
        self,
        prefix: str,
        suffix: str,
        *,
        extra_files: Sequence[tuple[str, str]] = (),
        repo_name: str | None = None,
        filename: str | None = None,
        **kwargs: object,
    ) -> Iterator[str]:
        """Yield the middle between `prefix` and `suffix` (see infill_ids for the prompt)."""
        ids = self.infill_ids(prefix, suffix, extra_files=extra_files, repo_name=repo_name, filename=filename)
        return self.generate(ids, **kwargs)  # type: ignore[arg-type]
