"""Request bodies of the API (pydantic). The OpenAI-compatible ones ignore fields they do not
use (clients send many); `/v1/generate`, picoalign's own, rejects unknown fields so a typo is
an error, not a silently ignored setting."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# Below this the logits divided by the temperature overflow to inf and sampling meets NaN
# probabilities (vLLM raises smaller temperatures to this value); 0 means greedy.
MIN_TEMPERATURE = 0.01
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI documents `seed`
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its legacy completions allow 5)


def _unicode(value):
    """Refuse text with a lone UTF-16 surrogate (JSON may carry `"\\ud800"`): no tokenizer can
    encode it. Checked on the raw value, before a union picks its member, so that the error
    names the field, not the member."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode text: a lone surrogate {value[e.start]!r} at character "
                             f"{e.start}") from None
    elif isinstance(value, (list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            _unicode(item)
    return value


def _temperature(value: float | None) -> float | None:
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: smaller values overflow the softmax")
    return value


Unicode = BeforeValidator(_unicode)


class Sampled(BaseModel):
    """Decoding fields every endpoint takes; None = the server's default."""

    temperature: Annotated[float | None, AfterValidator(_temperature)] = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Annotated[str | list[str] | None, Unicode] = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stop if s)


class GenerateRequest(Sampled):
    """`POST /v1/generate`, the original server's request: `{prompt, max_new_tokens, ...}`."""

    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Unicode] = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    greedy: bool = False
    raw: bool = Field(False, description="skip the chat template")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], Unicode]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(Sampled):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(OpenAIRequest):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each answer token's log-prob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")


class CompletionRequest(OpenAIRequest):
    """`POST /v1/completions`: raw text (or token ids) in, no chat template; a list of prompts
    joins the batch together. `max_tokens` 0 with `echo` scores the prompt without generating."""

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], Unicode]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")
    echo: bool = Field(False, description="the prompt before the answer (and its tokens' log-probs)")
