"""The model engine API every backend implements, and what plugins may ask of it.

Backends: `bot.engine.local` (llama-cpp-python in-process, the default) and `bot.engine.openai`
(any OpenAI-compatible server), picked by QUILL_ENGINE_BACKEND in `start_engine`. Plugins see only
this async API (`chat`, `stream`, `chat_structured`, `count_tokens`), so a backend can batch
conversations or live on another machine without them noticing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from bot.types import QuillError

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

# Tokens a chat template adds around each message (role markers, separators). SmolLM2's
# ChatML adds 5; a little more keeps other templates inside the context too.
MESSAGE_OVERHEAD_TOKENS = 8

Model = TypeVar("Model", bound=BaseModel)


class EngineError(QuillError):
    """A request the engine could not serve; the message is fit to show a user."""


class ModelLoadError(EngineError):
    """The model file is missing or unreadable; raised at start-up."""


class ContextOverflow(EngineError):
    """The prompt does not fit in the model's context window."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request sampling settings."""

    max_tokens: int = 512
    temperature: float = 0.7
    stop: Sequence[str] = ()
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # Whose messages the prompt holds (`bot.api.state_tags`: place, guild, users): a backend that
    # keeps conversation states drops the ones holding erased messages (`forget_states`).
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ChatResult:
    text: str
    completion_tokens: int
    finish_reason: str | None


class Engine(Protocol):
    """What plugins and the core may ask of a model backend."""

    n_ctx: int
    # What this backend can do ("stream", "grammar", "json_schema", "tokenize", "embeddings", "lora");
    # a plugin that needs a feature checks for it at start-up and says plainly when it is missing.
    features: frozenset[str]

    def stream(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[str]:
        """Yield the reply's text as it is generated."""
        ...

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        """Return the whole reply."""
        ...

    async def chat_structured(
        self, messages: Sequence[ChatMessage], model: type[Model], options: GenerationOptions
    ) -> Model:
        """Return a reply constrained to `model`'s JSON schema, parsed and validated."""
        ...

    async def count_tokens(self, text: str) -> int:
        """Number of tokens `text` takes in this model."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One embedding vector per text (feature "embeddings")."""
        ...

    async def set_adapter(self, path: Path | None) -> None:
        """Serve with this LoRA adapter from the next request on (None: the base model),
        without dropping queued requests (feature "lora")."""
        ...

    async def forget_states(self, tags: Collection[str] | None = None) -> int:
        """Drop kept conversation states that may hold messages with any of `tags` (and those
        kept without tags); None drops all. How many were dropped."""
        ...

    async def close(self) -> None:
        """Stop the backend; pending requests fail."""
        ...


def reply_room(prompt_tokens: int, n_ctx: int) -> int:
    """Tokens left for the reply after the prompt; too few to answer is ContextOverflow."""
    room = n_ctx - prompt_tokens
    if room < 16:
        raise ContextOverflow(
            f"The prompt takes about {prompt_tokens} tokens; the model's context holds {n_ctx} (QUILL_N_CTX)."
        )
    return room


async def structured_chat(
    engine: Engine, messages: Sequence[ChatMessage], model: type[Model], options: GenerationOptions
) -> Model:
    """Ask for JSON matching `model`'s schema, then validate it: the grammar bounds the shape,
    but a reply cut short by `max_tokens` can still be incomplete."""
    constrained = replace(options, grammar=None, json_schema=model.model_json_schema())
    result = await engine.chat(messages, constrained)
    try:
        return model.model_validate_json(result.text)
    except ValidationError as exc:
        raise EngineError(
            f"The model's structured reply did not match {model.__name__} "
            f"(finish reason: {result.finish_reason}): {exc.errors()[0]['msg']}"
        ) from exc


async def start_engine(settings: Settings) -> Engine:
    """Build the backend QUILL_ENGINE_BACKEND names (for `local`, in QUILL_ENGINE_MODE) and start
    it; a fault is one ModelLoadError."""
    if settings.engine_backend == "openai":
        from bot.engine.openai import OpenAIEngine

        remote = OpenAIEngine(settings)
        await remote.start()
        return remote
    from bot.engine.batched import BatchedEngine
    from bot.engine.local import LocalEngine

    local = BatchedEngine(settings) if settings.engine_mode == "batched" else LocalEngine(settings)
    await asyncio.to_thread(local.start)
    return local
