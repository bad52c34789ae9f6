"""The server backend: any OpenAI-compatible inference server (llama.cpp's llama-server, vLLM,
Ollama, llama-cpp-python's own server) reached over HTTP with httpx.

Several bot processes can share one server (or a load balancer in front of several), and a
model bigger than the bot's machine can live on a GPU box. What the server offers beyond
chat (grammars, JSON schemas, tokenizing, embeddings, its context size) is probed once at
start-up; a missing feature is logged then and refused with a plain EngineError when asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from bot.config import Settings
from bot.engine import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMessage,
    ChatResult,
    ContextOverflow,
    EngineError,
    GenerationOptions,
    Model,
    ModelLoadError,
    reply_room,
    structured_chat,
)
from bot.engine.local import check_model_file
from bot.types import Text

log = logging.getLogger(__name__)

# Answers that mean "busy or restarting, ask again": retried with backoff.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# First backoff delay in seconds; it doubles per retry, and a Retry-After header wins (capped).
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 10.0
# Without a tokenizer, a token is taken to be 3 bytes of UTF-8: English averages about 4,
# so history trimming errs on the safe side.
ESTIMATE_BYTES_PER_TOKEN = 3
EMBEDDINGS_HINT = (
    "start the server with embeddings on (llama-server: --embeddings --pooling mean, as a chat model names no "
    "pooling of its own; llama-cpp-python: --embedding true)"
)
PROBE = [{"role": "user", "content": "Say ok."}]
PROBE_TEXT = "the cat sat on the mat"
PROBE_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "Say ok.", "parameters": PROBE_SCHEMA}}


def estimate_tokens(text: str) -> int:
    """A tokenizer-free upper estimate of the tokens in `text`."""
    return math.ceil(len(text.encode("utf-8", "replace")) / ESTIMATE_BYTES_PER_TOKEN)


class ServerRefused(EngineError):
    """The server answered a request with an HTTP error; `status` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachable(EngineError):
    """No connection to the server; `reason` is the network's word for why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _message_of(body: Any) -> str:
    """The server's own words from an error body: OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, or the body itself."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and (found := error.get("message") or error.get("detail")):
            return str(found).strip()[:500]
        if isinstance(error, str):
            return error.strip()[:500]
    return json.dumps(body)[:500]


def _error_text(response: httpx.Response) -> str:
    try:
        return _message_of(response.json())
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase


def _add_call_piece(calls: dict[int, dict[str, Any]], part: dict[str, Any]) -> None:
    """Join a streamed piece of a tool call to the call of its index (id and name come first,
    the arguments' JSON in pieces)."""
    call = calls.setdefault(
        int(part.get("index") or 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
    )
    call["id"] = part.get("id") or call["id"]
    function = part.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""


def _mean(vectors: list[list[float]]) -> list[float]:
    return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]


class OpenAIEngine:
    """Talks to one OpenAI-compatible endpoint; safe to share between concurrent requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n_ctx = settings.n_ctx
        self.features: frozenset[str] = frozenset()
        self.model = settings.openai_model
        self.embedding_model = settings.openai_embedding_model  # empty: `model`, once known
        self.base_url = settings.openai_base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        # How errors name the server: users see these, admins recognise the URL.
        self.who = f"The model server ({self.base_url})"
        self.json_format: str | None = None
        self._count: Callable[[str], Awaitable[int]] = self._count_estimate
        self._vocab: Any = None
        # llama-cpp-python's server sends one vector per token for a model without pooling, and
        # 0.3.36 mixes them up past the first input of a batch: such texts go one at a time.
        self._embed_one_by_one = False
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach the server, check the model name and probe what it offers; any fault at this
        point is one ModelLoadError naming the URL and the setting to fix."""
        s = self.settings
        headers = {}
        if s.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {s.openai_api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(headers=headers)
        if s.log_level != "DEBUG":  # httpx logs every request (several per reply) at INFO
            logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            await self._check_model()
            await self._probe()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _check_model(self) -> None:
        try:
            listing = await self._get_json(f"{self.base_url}/models")
        except ServerRefused as exc:
            if exc.status != 404:
                raise ModelLoadError(f"{exc} (QUILL_OPENAI_BASE_URL, QUILL_OPENAI_API_KEY)") from exc
            listing = None  # not every server lists its models; the test request below finds out
        except ServerUnreachable as exc:
            raise ModelLoadError(
                f"Cannot reach the inference server at {self.base_url} (QUILL_OPENAI_BASE_URL): "
                f"{exc.reason}. "
                "Start the server or fix QUILL_OPENAI_BASE_URL; QUILL_ENGINE_BACKEND=local runs the model "
                "in-process instead."
            ) from exc
        except EngineError as exc:
            raise ModelLoadError(f"{exc} (QUILL_OPENAI_BASE_URL)") from exc
        models = [m for m in listing.get("data", []) if isinstance(m, dict)] if listing else []
        names = [str(m.get("id")) for m in models]
        if not self.model and not names:
            raise ModelLoadError(f"The inference server at {self.base_url} lists no models; set QUILL_OPENAI_MODEL.")
        if not self.model:
            self.model = names[0]
        elif names and self.model not in names:
            raise ModelLoadError(
                f"The inference server at {self.base_url} has no model {self.model!r} "
                f"(QUILL_OPENAI_MODEL); it serves: {', '.join(names)}."
            )
        self.embedding_model = self.embedding_model or self.model
        # vLLM reports the context it serves with; llama-server reports it in /props.
        served = next((m for m in models if str(m.get("id")) == self.model), {})
        n_ctx = served.get("max_model_len")
        if not n_ctx and (props := await self._get_json(f"{self.root_url}/props", quiet=True)):
            n_ctx = props.get("n_ctx") or props.get("default_generation_settings", {}).get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            self.n_ctx = n_ctx
        else:
            log.info("the server does not report its context size; taking QUILL_N_CTX=%d", self.n_ctx)
        try:
            await self._chat_payload(self._payload(PROBE, 1, 0.0))
        except EngineError as exc:
            raise ModelLoadError(
                f"The inference server at {self.base_url} (QUILL_OPENAI_BASE_URL) cannot answer with "
                f"model {self.model!r} (QUILL_OPENAI_MODEL): {exc}"
            ) from exc

    async def _probe(self) -> None:
        """Find out which optional features the server offers, and say which ones it lacks."""
        features = {"stream"}
        lacking: dict[str, str] = {}
        try:
            # A server that ignores an unknown `grammar` field would still answer: check the text.
            result = await self._chat_payload(self._payload(PROBE, 2, 0.0, grammar='root ::= "ok"'))
            if result.text == "ok":
                features.add("grammar")
            else:
                lacking["grammar"] = "it ignores GBNF grammars"
        except EngineError as exc:
            lacking["grammar"] = str(exc)
        formats = ["json_schema", "json_object"]
        if self.settings.openai_json_format != "auto":
            formats = [self.settings.openai_json_format]
        reasons = []
        for fmt in formats:
            try:
                await self._chat_payload(self._payload(PROBE, 1, 0.0, json_format=fmt, schema=PROBE_SCHEMA))
            except EngineError as exc:
                reasons.append(f"{fmt}: {exc}")
                continue
            self.json_format = fmt
            features.add("json_schema")
            break
        else:
            lacking["json_schema"] = "; ".join(reasons)
        try:
            # tool_choice "required" must give a call: a server that only forces named tools
            # (llama-cpp-python's) would never call one on its own, so it gets the grammar instead.
            probe = {**self._payload(PROBE, 32, 0.0), "tools": [PROBE_TOOL], "tool_choice": "required"}
            calls = (await self._chat_payload(probe)).tool_calls
            if calls and calls[0].get("function", {}).get("name") == "probe":
                features.add("tools")
            else:
                lacking["tools"] = "it does not return tool calls for tool_choice=required"
        except EngineError as exc:
            lacking["tools"] = str(exc)
        try:
            await self._check_batched_embeddings()
            features.add("embeddings")
        except EngineError as exc:
            lacking["embeddings"] = f"{str(exc).rstrip('.')}. To use them, {EMBEDDINGS_HINT}."
        if await self._find_counter():
            features.add("tokenize")
        else:
            lacking["tokenize"] = f"token counts are estimated at {ESTIMATE_BYTES_PER_TOKEN} bytes a token"
        self.features = frozenset(features)
        log.info(
            "inference server %s, model %s: n_ctx=%d, features: %s%s",
            self.base_url,
            self.model,
            self.n_ctx,
            ", ".join(sorted(self.features)),
            f", JSON schemas sent as {self.json_format}" if self.json_format else "",
        )
        for feature, why in lacking.items():
            log.warning("inference server %s lacks %r: %s", self.base_url, feature, why)

    async def _check_batched_embeddings(self) -> None:
        """Embed a text twice in one request: a server that gives it two different vectors mixes
        up texts embedded together (llama-server with a KV cache per slot, `--parallel` N without
        `--kv-unified`), so each text is sent on its own from then on."""
        first, _, again = await self._embed([PROBE_TEXT, "a different text", PROBE_TEXT], retries=0)
        if max((abs(a - b) for a, b in zip(first, again, strict=True)), default=0.0) > 1e-4:
            self._embed_one_by_one = True
            log.warning(
                "inference server %s gave one text two different embeddings in one request; quill sends each text "
                "on its own (slower). llama-server does this with --parallel N unless started with --kv-unified.",
                self.base_url,
            )

    async def _find_counter(self) -> bool:
        """Pick how to count tokens: the server's tokenizer, the local vocabulary of the same
        GGUF (QUILL_MODEL_PATH, set explicitly), or the estimate. True unless the estimate."""
        for counter in (self._count_tokenize, self._count_extras):
            try:
                if await counter("hello world") > 0:
                    self._count = counter
                    return True
            except EngineError:
                continue
        if "model_path" in self.settings.model_fields_set:
            try:
                check_model_file(self.settings.model_path)
                self._vocab = await asyncio.to_thread(self._load_vocab)
            except (ModelLoadError, ValueError, RuntimeError, OSError) as exc:
                log.warning("cannot read the tokenizer of %s: %s", self.settings.model_path, exc)
            else:
                self._count = self._count_vocab
                return True
        return False

    def _load_vocab(self) -> Any:
        from llama_cpp import Llama

        return Llama(model_path=str(self.settings.model_path), vocab_only=True, verbose=False)

    # -- HTTP ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _request(
        self, method: str, url: str, payload: dict[str, Any] | None = None, *, retries: int | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Send one request and yield the response with its body still to read.

        Busy answers (429/502/503/504) and failed connections are retried with backoff; other
        HTTP errors raise EngineError with the server's own words; a timeout or a connection lost
        while reading becomes a plain EngineError too."""
        if self._client is None:
            raise EngineError("The model server connection is closed.")
        retries = self.settings.openai_max_retries if retries is None else retries
        failure = EngineError("no attempt made")
        for attempt in range(retries + 1):
            wait = RETRY_BASE_DELAY * 2**attempt
            try:
                # Read per request, so a changed setting applies to the next one.
                limit = self.settings.openai_timeout
                timeout = httpx.Timeout(limit, connect=min(limit, 10.0))
                response = await self._client.send(
                    self._client.build_request(method, url, json=payload, timeout=timeout), stream=True
                )
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
                    raise self._too_slow() from exc
                reason = str(exc) or type(exc).__name__
                failure = ServerUnreachable(f"{self.who} is not reachable: {reason}.", reason)
            else:
                if response.status_code < 400:
                    try:
                        yield response
                    except httpx.TimeoutException as exc:
                        raise self._too_slow() from exc
                    except httpx.TransportError as exc:
                        raise EngineError(
                            Text(
                                "The model server ({url}) stopped in the middle of the reply ({reason}); the "
                                "partial reply was not kept.",
                                url=self.base_url,
                                reason=str(exc) or type(exc).__name__,
                            )
                        ) from exc
                    finally:
                        await response.aclose()
                    return
                try:
                    await response.aread()
                except httpx.HTTPError:
                    pass
                finally:
                    await response.aclose()
                failure = self._refused(response)
                if response.status_code not in RETRY_STATUSES:
                    raise failure
                after = response.headers.get("retry-after", "")
                wait = float(after) if after.replace(".", "", 1).isdigit() else wait
            if attempt < retries:
                log.info("model server: %s; retry %d of %d in %.1f s", failure, attempt + 1, retries, wait)
                await asyncio.sleep(min(wait, RETRY_MAX_DELAY))
        if retries:
            times = "retry" if retries == 1 else "retries"
            failure.args = (f"{failure} Still so after {retries} {times}; please try again in a moment.",)
        raise failure

    def _refused(self, response: httpx.Response) -> ServerRefused | ContextOverflow:
        text = _error_text(response)
        message = f"{self.who} refused the request (HTTP {response.status_code}): {text}"
        if response.status_code in RETRY_STATUSES:
            message = f"{self.who} is busy (HTTP {response.status_code}: {text})."
        elif response.status_code == 400 and "context" in text.lower():
            return ContextOverflow(message)
        elif response.status_code in (401, 403):
            message += " (check QUILL_OPENAI_API_KEY)"
        return ServerRefused(message, response.status_code)

    def _too_slow(self) -> EngineError:
        return EngineError(
            Text(
                "The model server ({url}) sent nothing for {seconds} s (QUILL_OPENAI_TIMEOUT), so the request was "
                "stopped. Please try again.",
                url=self.base_url,
                seconds=f"{self.settings.openai_timeout:g}",
            )
        )

    async def _get_json(self, url: str, *, quiet: bool = False) -> dict[str, Any] | None:
        """GET a JSON object; with `quiet`, any failure (an endpoint this server lacks) is None."""
        try:
            async with self._request("GET", url, retries=0 if quiet else None) as response:
                body = json.loads(await response.aread())
        except (EngineError, ValueError):
            if quiet:
                return None
            raise
        return body if isinstance(body, dict) else None

    async def _post_json(self, url: str, payload: dict[str, Any], *, retries: int | None = None) -> Any:
        async with self._request("POST", url, payload, retries=retries) as response:
            try:
                return json.loads(await response.aread())
            except ValueError as exc:
                raise EngineError(
                    Text("The model server ({url}) sent a reply that is not JSON.", url=self.base_url)
                ) from exc

    # -- generation ------------------------------------------------------------------------

    def _payload(
        self,
        messages: Sequence[ChatMessage] | list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        *,
        stop: Sequence[str] = (),
        grammar: str | None = None,
        json_format: str | None = None,
        schema: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m if isinstance(m, dict) else m.as_dict() for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if stop:
            payload["stop"] = list(stop)
        if self.settings.seed >= 0:
            payload["seed"] = self.settings.seed
        if grammar:
            payload["grammar"] = grammar  # llama-server and llama-cpp-python's server take GBNF here
        if schema is not None and json_format == "json_schema":
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            }
        elif schema is not None:
            payload["response_format"] = {"type": "json_object", "schema": schema}
        return payload

    async def _options_payload(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> dict[str, Any]:
        """The request for `options`, refusing what this server was found not to offer and
        what does not fit its context (llama-cpp-python's server would only drop the stream)."""
        if options.grammar and "grammar" not in self.features:
            raise EngineError(
                f"{self.who} does not take GBNF grammars; "
                "this request needs one (use llama.cpp's llama-server, or QUILL_ENGINE_BACKEND=local)."
            )
        if options.json_schema is not None and self.json_format is None:
            raise EngineError(
                f"{self.who} does not take JSON schemas (response_format); this request needs structured output."
            )
        if options.tools and "tools" not in self.features:
            raise EngineError(f"{self.who} does not return tool calls (the `tools` field).")
        contents = "\n".join(m.content for m in messages)
        prompt_tokens = await self.count_tokens(contents) + MESSAGE_OVERHEAD_TOKENS * len(messages)
        payload = self._payload(
            messages,
            min(options.max_tokens, reply_room(prompt_tokens, self.n_ctx)),
            options.temperature,
            stop=options.stop,
            grammar=options.grammar,
            json_format=self.json_format,
            schema=options.json_schema,
        )
        if options.tools:
            payload.update(tools=list(options.tools), tool_choice="auto")
        return payload

    async def _events(self, payload: dict[str, Any]) -> AsyncIterator[str | ChatResult]:
        """Stream a chat completion: text pieces as they come, then a ChatResult without text
        (with the tool calls, whose pieces are joined by their index).

        A stream that ends without a finish reason was cut short (the server died, or
        llama-cpp-python's server interrupted it for a newer request): that is an error, so the
        partial reply is never taken for a finished one."""
        url = f"{self.base_url}/chat/completions"
        pieces, reason, usage = 0, None, None
        calls: dict[int, dict[str, Any]] = {}
        async with self._request("POST", url, payload) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise EngineError(
                        Text("The model server ({url}) sent a malformed event.", url=self.base_url)
                    ) from exc
                if chunk.get("error"):
                    raise EngineError(
                        Text("The model server ({url}) failed: {reason}", url=self.base_url, reason=_message_of(chunk))
                    )
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    # U+FFFD is how a server shows bytes that were no UTF-8 (a character cut by
                    # max_tokens, a broken sequence): dropped, as the local backend drops them.
                    text = ((choice.get("delta") or {}).get("content") or "").replace("\ufffd", "")
                    if text:
                        pieces += 1
                        yield text
                    for part in (choice.get("delta") or {}).get("tool_calls") or []:
                        _add_call_piece(calls, part)
                    reason = choice.get("finish_reason") or reason
        if reason is None:
            raise EngineError(
                Text(
                    "The model server ({url}) ended the reply before it was finished; the partial reply was not kept.",
                    url=self.base_url,
                )
            )
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        yield ChatResult(
            "", tokens if isinstance(tokens, int) else pieces, reason, tuple(calls[i] for i in sorted(calls))
        )

    async def _chat_payload(self, payload: dict[str, Any]) -> ChatResult:
        parts: list[str] = []
        finish = ChatResult("", 0, None)
        async for item in self._events(payload):
            if isinstance(item, str):
                parts.append(item)
            else:
                finish = item
        return ChatResult("".join(parts), finish.completion_tokens, finish.finish_reason, finish.tool_calls)

    async def stream(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[str]:
        async for item in self._events(await self._options_payload(messages, options)):
            if isinstance(item, str):
                yield item

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        return await self._chat_payload(await self._options_payload(messages, options))

    async def chat_structured(
        self, messages: Sequence[ChatMessage], model: type[Model], options: GenerationOptions
    ) -> Model:
        return await structured_chat(self, messages, model, options)

    # -- tokens and embeddings -------------------------------------------------------------

    async def count_tokens(self, text: str) -> int:
        """Count with the best tokenizer found at start-up. Counting only sizes the history, so
        when the server fails to answer the estimate stands in rather than losing the message."""
        if not text:
            return 0
        try:
            return await self._count(text)
        except EngineError as exc:
            log.warning("token count from the server failed (%s); estimating", exc)
            return await self._count_vocab(text) if self._vocab is not None else estimate_tokens(text)

    async def _count_tokenize(self, text: str) -> int:
        """llama-server's /tokenize (`content`) or vLLM's (`prompt`)."""
        body = await self._post_json(
            f"{self.root_url}/tokenize",
            {"content": text, "prompt": text, "model": self.model, "add_special": False},
            retries=0,
        )
        if isinstance(body, dict) and isinstance(body.get("count"), int):
            return int(body["count"])
        if isinstance(body, dict) and isinstance(body.get("tokens"), list):
            return len(body["tokens"])
        raise EngineError("unexpected /tokenize answer")

    async def _count_extras(self, text: str) -> int:
        """llama-cpp-python's server: /extras/tokenize/count."""
        body = await self._post_json(
            f"{self.root_url}/extras/tokenize/count", {"input": text, "model": self.model}, retries=0
        )
        if isinstance(body, dict) and isinstance(body.get("count"), int):
            return int(body["count"])
        raise EngineError("unexpected /extras/tokenize/count answer")

    async def _count_vocab(self, text: str) -> int:
        data = text.encode("utf-8", errors="replace")
        return len(await asyncio.to_thread(self._vocab.tokenize, data, False, False))

    async def _count_estimate(self, text: str) -> int:
        return estimate_tokens(text)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if "embeddings" not in self.features:
            raise EngineError(f"{self.who} does not serve embeddings (/v1/embeddings): {EMBEDDINGS_HINT}.")
        return await self._embed(texts) if texts else []

    async def _embed(self, texts: Sequence[str], retries: int | None = None) -> list[list[float]]:
        """One vector per text from /v1/embeddings. A server that returns one vector per token
        (llama-cpp-python's server on a model without a pooling type) gets them averaged."""
        if self._embed_one_by_one and len(texts) > 1:
            return [vector for text in texts for vector in await self._embed([text], retries)]
        body = await self._post_json(
            f"{self.base_url}/embeddings", {"model": self.embedding_model, "input": list(texts)}, retries=retries
        )
        try:
            rows = sorted(body["data"], key=lambda row: row.get("index", 0))
            vectors = [row["embedding"] for row in rows]
            if vectors and vectors[0] and isinstance(vectors[0][0], list):
                self._embed_one_by_one = True
                return [_mean(v) for v in vectors]
            return [[float(x) for x in v] for v in vectors]
        except (KeyError, TypeError, IndexError) as exc:
            raise EngineError(f"{self.who} sent embeddings in an unknown shape.") from exc

    async def forget_states(self, tags: Collection[str] | None = None) -> int:
        """A server's prompt cache is its own: no OpenAI-compatible API drops it by whose
        messages it holds. It is only ever reused for a prompt that starts with the same text."""
        return 0

    async def set_adapter(self, path: Path | None) -> None:
        """A server loads adapters itself; say exactly how instead of pretending."""
        what = f"the adapter {path}" if path is not None else "the base model (no adapter)"
        raise EngineError(
            f"QUILL_ENGINE_BACKEND=openai cannot switch the server at {self.base_url} to {what}. "
            "On llama.cpp's llama-server: copy the GGUF adapter to the server, restart it with "
            "`--lora FILE` (several --lora flags give several adapters, ids 0, 1, ...), then set "
            f"each one's scale with POST {self.root_url}/lora-adapters and a body like "
            '[{"id": 0, "scale": 1.0}] (scale 0.0 switches it off). On vLLM: start it with --enable-lora and '
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, POST "
            f'{self.base_url}/load_lora_adapter {{"lora_name": "NAME", "lora_path": "DIR"}}, then set '
            "QUILL_OPENAI_MODEL=NAME and restart the bot."
        )
