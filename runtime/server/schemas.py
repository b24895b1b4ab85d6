"""Request bodies of every endpoint, as pydantic models.

Strict JSON types (a number is not a string, a boolean is not a number), unknown fields ignored,
NaN and infinities refused. Bounds that do not depend on the model are checked here; the rest
(token ids in the vocabulary, prompt length against the context) where the model is known.
A field's `description` is what the 400 message says when a value of the wrong type is sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 64  # llama.cpp endpoints; OpenAI's own limit of 4 applies to /v1
MAX_STOP_LENGTH = 1000
MAX_N_PROBS = 20

StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# --- OpenAI ------------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = False


class OpenAIOptions(_Body):
    model: str | None = None  # one model is served: any name is accepted
    temperature: float | None = Field(default=None, ge=0, le=2, description="a number from 0 to 2")
    top_p: float | None = Field(default=None, ge=0, le=1, description="a number from 0 to 1")
    stop: str | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        default=None, description="a string or a list of at most 4 strings"
    )
    seed: int | None = Field(default=None, le=MAX_SEED, description="an integer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, description="1")
    # llama.cpp's extensions of the OpenAI API
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)


class CompletionRequest(OpenAIOptions):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a string, a list of token ids, or a list holding one string or one list of token ids"
    )
    suffix: str | None = Field(default=None, description="a string")
    max_tokens: int | None = Field(default=None, ge=0, description="an integer >= 0")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="an integer from 0 to 5")
    echo: bool = False
    best_of: int | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentPart] | None = Field(default=None, description="a string or a list of text parts")


class ChatCompletionRequest(OpenAIOptions):
    messages: list[ChatMessage] = Field(min_length=1, description="a non-empty list of {role, content} messages")
    max_tokens: int | None = Field(default=None, ge=0, description="an integer >= 0")
    max_completion_tokens: int | None = Field(default=None, ge=0, description="an integer >= 0")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_N_PROBS)


# --- llama.cpp ---------------------------------------------------------------------------------


class LlamaOptions(_Body):
    n_predict: int | None = Field(default=None, ge=-1, description="an integer >= -1 (-1: no limit)")
    max_tokens: int | None = Field(default=None, ge=-1, description="an integer >= -1 (-1: no limit)")  # alias
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = Field(default=0.95, ge=0, le=1)
    min_p: float = Field(default=0.05, ge=0, le=1)
    repeat_penalty: float = Field(default=1.0, gt=0)
    repeat_last_n: int = Field(default=64, ge=-1)  # -1: the whole context
    seed: int = Field(default=-1, le=MAX_SEED)  # negative: random
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | StopString | None = Field(
        default=None, description=f"a list of at most {MAX_STOP_STRINGS} strings"
    )
    stream: bool = False
    n_probs: int = Field(default=0, ge=0, le=MAX_N_PROBS)
    cache_prompt: bool = True  # reuse a slot's cached prefix (false: recompute the whole prompt)
    return_tokens: bool = False
    t_max_predict_ms: int | None = Field(default=None, ge=0)  # a time limit, as llama.cpp; 0: none


class LlamaCompletionRequest(LlamaOptions):
    prompt: str | list[int | str] = Field(description="a string or a list of token ids and strings")


class ExtraFile(_Body):
    filename: str = "tmp"
    text: str = ""


class InfillRequest(LlamaOptions):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = Field(default_factory=list, description="a list of {filename, text} objects")
    prompt: str = ""


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int] = Field(default_factory=list, description="a list of token ids")
