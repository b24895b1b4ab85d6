"""Request bodies of every endpoint, as keyword-only dataclasses checked by runtime/server/validation.py.

Strict JSON types (a number is not a string, a boolean is not a number), unknown fields ignored;
NaN and infinities are refused when the body is parsed. Bounds that do not depend on the model are
checked here; the rest (token ids in the vocabulary, prompt length against the context) where the
model is known. A field's `about` is what the 400 message says it must be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from runtime.server.validation import Bounds, field

MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 64  # llama.cpp endpoints; OpenAI's own limit of 4 applies to /v1
MAX_STOP_LENGTH = 1000
MAX_N_PROBS = 20

StopString = Annotated[str, Bounds(max_length=MAX_STOP_LENGTH)]
request = dataclass(kw_only=True, frozen=True)


# --- OpenAI ------------------------------------------------------------------------------------


@request
class StreamOptions:
    include_usage: bool = False


@request
class OpenAIOptions:
    model: str | None = None  # one model is served: any name is accepted
    temperature: Annotated[float, Bounds(ge=0, le=2)] | None = field(None, about="a number from 0 to 2")
    top_p: Annotated[float, Bounds(ge=0, le=1)] | None = field(None, about="a number from 0 to 1")
    stop: str | Annotated[list[StopString], Bounds(max_length=4)] | None = field(
        None, about="a string or a list of at most 4 strings"
    )
    seed: Annotated[int, Bounds(le=MAX_SEED)] | None = field(None, about="an integer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = field(None, about="1")
    # llama.cpp's extensions of the OpenAI API
    top_k: int | None = None
    min_p: Annotated[float, Bounds(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Bounds(gt=0)] | None = None


@request
class CompletionRequest(OpenAIOptions):
    prompt: str | list[int] | list[str] | list[list[int]] = field(
        about="a string, a list of token ids, or a list holding one string or one list of token ids"
    )
    suffix: str | None = field(None, about="a string")
    max_tokens: Annotated[int, Bounds(ge=0)] | None = field(None, about="an integer >= 0")
    logprobs: Annotated[int, Bounds(ge=0, le=5)] | None = field(None, about="an integer from 0 to 5")
    echo: bool = False
    best_of: int | None = None


@request
class ContentPart:
    type: str
    text: str | None = None


@request
class ChatMessage:
    role: Annotated[str, Bounds(min_length=1, max_length=64)]
    content: str | list[ContentPart] | None = field(None, about="a string or a list of text parts")


@request
class ChatCompletionRequest(OpenAIOptions):
    messages: Annotated[list[ChatMessage], Bounds(min_length=1)] = field(
        about="a non-empty list of {role, content} messages"
    )
    max_tokens: Annotated[int, Bounds(ge=0)] | None = field(None, about="an integer >= 0")
    max_completion_tokens: Annotated[int, Bounds(ge=0)] | None = field(None, about="an integer >= 0")
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Bounds(ge=0, le=MAX_N_PROBS)] | None = None


# --- llama.cpp ---------------------------------------------------------------------------------


@request
class LlamaOptions:
    n_predict: Annotated[int, Bounds(ge=-1)] | None = field(None, about="an integer >= -1 (-1: no limit)")
    max_tokens: Annotated[int, Bounds(ge=-1)] | None = field(None, about="an integer >= -1 (-1: no limit)")  # alias
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: Annotated[float, Bounds(ge=0, le=1)] = 0.95
    min_p: Annotated[float, Bounds(ge=0, le=1)] = 0.05
    repeat_penalty: Annotated[float, Bounds(gt=0)] = 1.0
    repeat_last_n: Annotated[int, Bounds(ge=-1)] = 64  # -1: the whole context
    seed: Annotated[int, Bounds(le=MAX_SEED)] = -1  # negative: random
    stop: Annotated[list[StopString], Bounds(max_length=MAX_STOP_STRINGS)] | StopString | None = field(
        None, about=f"a list of at most {MAX_STOP_STRINGS} strings"
    )
    stream: bool = False
    n_probs: Annotated[int, Bounds(ge=0, le=MAX_N_PROBS)] = 0
    cache_prompt: bool = True  # reuse a slot's cached prefix (false: recompute the whole prompt)
    return_tokens: bool = False
    t_max_predict_ms: Annotated[int, Bounds(ge=0)] | None = None  # a time limit, as llama.cpp; 0: none


@request
class LlamaCompletionRequest(LlamaOptions):
    prompt: str | list[int | str] = field(about="a string or a list of token ids and strings")


@request
class ExtraFile:
    filename: str = "tmp"
    text: str = ""


@request
class InfillRequest(LlamaOptions):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = field(factory=list, about="a list of {filename, text} objects")
    prompt: str = ""


@request
class TokenizeRequest:
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


@request
class DetokenizeRequest:
    tokens: list[int] = field(factory=list, about="a list of token ids")
