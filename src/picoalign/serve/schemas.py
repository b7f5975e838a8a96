"""Request bodies of the API (pydantic). The OpenAI-compatible ones ignore fields they do not
use (clients send many); `/v1/generate`, picoalign's own, rejects unknown fields so a typo is
an error, not a silently ignored setting."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Sampled(BaseModel):
    """Decoding fields every endpoint takes; None = the server's default."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stop if s)


class GenerateRequest(Sampled):
    """`POST /v1/generate`, the original server's request: `{prompt, max_new_tokens, ...}`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    greedy: bool = False
    raw: bool = Field(False, description="skip the chat template")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

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


class CompletionRequest(OpenAIRequest):
    """`POST /v1/completions`: raw text in, no chat template; a list of prompts is one batch."""

    prompt: str | list[str]
