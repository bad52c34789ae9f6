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

from bot.types import QuillError, Text

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
    # A tool call the assistant made (OpenAI's shape: id, type, function name and arguments) and,
    # on the "tool" message that answers it, its id: chat templates that know tools read these.
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request sampling settings."""

    max_tokens: int = 512
    temperature: float = 0.7
    stop: Sequence[str] = ()
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # OpenAI-style tool definitions, sent as the `tools` field (feature "tools", the openai backend).
    tools: tuple[dict[str, Any], ...] = ()
    # Whose messages the prompt holds (`bot.api.state_tags`: place, guild, users): a backend that
    # keeps conversation states drops the ones holding erased messages (`forget_states`).
    tags: frozenset[str] = frozenset()
    # The reply's beginning, already written (feature "prefix"): the model continues it, and the
    # text returned leaves it out. The tool loop writes `{"tool": "` this way, so the model
    # writes only the tool's name (bot/tools.py `choice_text`).
    prefix: str = ""


@dataclass(frozen=True)
class ChatResult:
    text: str
    completion_tokens: int
    finish_reason: str | None
    # The tool calls a server that takes `tools` returned (OpenAI's shape), in order.
    tool_calls: tuple[dict[str, Any], ...] = ()


class Engine(Protocol):
    """What plugins and the core may ask of a model backend."""

    n_ctx: int
    # What this backend can do ("stream", "grammar", "json_schema", "tokenize", "embeddings", "lora",
    # "tools": OpenAI's `tools` field with tool_choice honoured, "prefix": GenerationOptions.prefix,
    # "batch": many requests decoded together and many conversations' states kept, so work done
    # ahead in the background pays off);
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
            Text(
                "The prompt takes about {tokens} tokens; the model's context holds {context} (QUILL_N_CTX).",
                tokens=prompt_tokens,
                context=n_ctx,
            )
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
            Text(
                "The model's structured reply did not match {form} (finish reason: {reason}): {problem}",
                form=model.__name__,
                reason=result.finish_reason,
                problem=exc.errors()[0]["msg"],
            )
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
