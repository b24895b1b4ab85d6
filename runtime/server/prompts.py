"""Turning what a request sends into prompt token ids and sampling parameters: prompts as text or
token ids, fill-in-the-middle, the chat template, and the checks that need the model (vocabulary).

Tokenizing runs on a worker thread: a multi-megabyte prompt must not stall the event loop.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from starlette.concurrency import run_in_threadpool

from runtime.engine import Model
from runtime.errors import GenerationError, UnsupportedModelError
from runtime.sampling import SamplingParams
from runtime.server.errors import APIError, bad_request
from runtime.server.schemas import ChatMessage

# The chat template for base (non-instruction-tuned) models: one "role: content" line per message,
# then "assistant:" for the model to continue; generation stops where it would start the user's turn.
CHAT_STOP = "\nuser:"
CHAT_TEMPLATE_DOC = '"{role}: {content}\\n" per message, then "assistant:"; stops at "\\nuser:"'


async def tokenize(model: Model, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
    if len(text) < 4096:
        return model.tokenizer.encode(text, special=special, add_bos=add_bos)
    return await run_in_threadpool(lambda: model.tokenizer.encode(text, special=special, add_bos=add_bos))


def check_ids(model: Model, ids: Sequence[int], param: str) -> list[int]:
    n = model.tokenizer.n_vocab
    for i in ids:
        if not 0 <= i < n:
            raise bad_request(f"token id {i} in '{param}' is outside the vocabulary (0..{n - 1})", param=param)
    return list(ids)


async def openai_prompt(model: Model, prompt: str | list[int] | list[str] | list[list[int]]) -> tuple[list[int], str]:
    """The ids and text of an OpenAI `prompt`: a string, token ids, or a list of one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise bad_request(
                f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per request", param="prompt"
            )
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        return await tokenize(model, prompt), prompt
    ids = check_ids(model, prompt, "prompt")  # type: ignore[arg-type]
    return ids, model.tokenizer.decode(ids)


async def llama_prompt(model: Model, prompt: str | list[int | str]) -> list[int]:
    """llama.cpp's `prompt`: a string, or token ids mixed with strings (each string tokenized on its
    own, control tokens such as <fim_prefix> recognised; BOS, if the model wants one, only first)."""
    if isinstance(prompt, str):
        return await tokenize(model, prompt)
    ids: list[int] = []
    for i, piece in enumerate(prompt):
        if isinstance(piece, str):
            ids += await tokenize(model, piece, add_bos=None if i == 0 else False)
        else:
            ids += check_ids(model, [piece], "prompt")
    return ids


async def infill_prompt(
    model: Model,
    prefix: str,
    suffix: str,
    *,
    extra_files: Sequence[tuple[str, str]] = (),
    middle: str = "",
    param: str = "input_prefix",
) -> list[int]:
    """Fill-in-the-middle ids via Model.infill_ids; with extra files, the repository-level form."""

    def build() -> list[int]:
        return model.infill_ids(prefix, suffix, extra_files=extra_files, middle_prompt=middle)

    try:
        if len(prefix) + len(suffix) + sum(len(t) for _, t in extra_files) < 4096:
            return build()
        return await run_in_threadpool(build)
    except UnsupportedModelError as e:
        raise APIError(400, str(e), param=param, code="fim_not_supported") from None


def message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"message {index} has a content part of type {part.type!r}: only text is supported",
                param=f"messages.{index}.content",
            )
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"{m.role}: {message_text(m, i)}\n" for i, m in enumerate(messages)) + "assistant:"


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sampling(
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    seed: int | None,
    n_ctx: int,
) -> SamplingParams:
    """SamplingParams from request values: temperature <= 0 or top_p 0 is greedy; a negative or
    missing seed draws a random one; repeat_last_n -1 is the whole context."""
    if top_p <= 0:
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(
        temperature=max(0.0, temperature),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        repeat_last_n=n_ctx if repeat_last_n < 0 else repeat_last_n,
        seed=secrets.randbelow(2**32) if seed is None or seed < 0 else seed,
    )
    try:
        params.validate()
    except GenerationError as e:
        raise bad_request(str(e)) from None
    return params
