"""The in-process backend: one `Llama` per process, owned by one worker thread that a queue feeds.

llama.cpp runs one request at a time per context, so every generation goes through the
worker in arrival order: the event loop never blocks and two requests never interleave in
the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.engine import (
    MESSAGE_OVERHEAD_TOKENS,
    ChatMessage,
    ChatResult,
    EngineError,
    GenerationOptions,
    Model,
    ModelLoadError,
    reply_room,
    structured_chat,
)
from bot.engine.contexts import Embedder
from bot.types import Text

log = logging.getLogger(__name__)

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick one at random"


class Prefilled:
    """Stands in for `Llama` inside `Llama.create_chat_completion` and adds the reply's written
    beginning (GenerationOptions.prefix) to the prompt its chat handler made: the template,
    the stop strings and the sampling stay `Llama`'s own."""

    def __init__(self, llm: Any, prefix: str) -> None:
        self._llm = llm
        self.prefix: list[int] = llm.tokenize(prefix.encode("utf-8"), False, False) if prefix else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def prefilled(self, request: dict[str, Any]) -> dict[str, Any]:
        """A completion request of the chat handler's, its prompt followed by the prefix."""
        return {**request, "prompt": [*request["prompt"], *self.prefix]}

    def create_completion(self, **kwargs: Any) -> Any:
        return self._llm.create_completion(**self.prefilled(kwargs))

    def chat(self, **kwargs: Any) -> Any:
        """`create_chat_completion(**kwargs)` on the model, the reply continuing the prefix."""
        import llama_cpp

        return llama_cpp.Llama.create_chat_completion(self, **kwargs)  # type: ignore[arg-type]


@dataclass
class _Finish:
    """The last item of a generation: why it stopped."""

    reason: str | None
    completion_tokens: int


@dataclass(eq=False)
class _Job:
    """One unit of work for the worker: a generator run on the model (or a request the worker
    schedules itself), its items sent back."""

    work: Callable[[Any], Iterator[Any]] | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # What a scheduling worker (bot.engine.batched) serves itself instead of running `work`.
    request: Any = None

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the requesting event loop is gone; nobody is listening
            self.cancelled.set()


def check_model_file(path: Path) -> None:
    """Fail with one clear message when the model file is missing or not GGUF."""
    hint = "Set QUILL_MODEL_PATH to a GGUF model file (or unset it to use the embedded SmolLM2-135M)."
    if not path.is_file():
        raise ModelLoadError(f"Model file not found: {path}. {hint}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"Model file {path} is not a GGUF file (it starts with {magic!r}). {hint}")


def attach_lora(ctx: Any, model: Any, loaded: dict[Path, Any], path: Path | None) -> None:
    """Attach the LoRA adapter at `path` to a llama.cpp context (None detaches). Each adapter is
    loaded once into `loaded` and kept for swapping back (rollback). Worker thread only."""
    import ctypes

    import llama_cpp

    if path is None:
        rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    else:
        adapter = loaded.get(path)
        if adapter is None:
            if not path.is_file():
                raise EngineError(f"LoRA adapter file not found: {path}")
            adapter = llama_cpp.llama_adapter_lora_init(model, str(path).encode())
            if not adapter:
                raise EngineError(f"Cannot load the LoRA adapter {path}: not an adapter for this model.")
            loaded[path] = adapter
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        rc = llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
    if rc != 0:
        raise EngineError(f"llama.cpp refused the LoRA adapter {path} ({rc}).")


class LocalEngine:
    """The in-process llama-cpp-python backend."""

    features = frozenset({"stream", "grammar", "json_schema", "tokenize", "embeddings", "lora", "prefix"})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n_ctx = settings.n_ctx
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._llm: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._adapters: dict[Path, Any] = {}  # loaded LoRA adapters, by path (worker thread only)
        self.adapter: Path | None = None  # the LoRA adapter served now
        self._embedder: Embedder | None = None  # made on first use, in the worker thread

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model in the worker thread; blocks until it is ready or has failed."""
        check_model_file(self.settings.model_path)
        self._thread = threading.Thread(target=self._worker, name="quill-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _load(self, n_ctx: int) -> Any:
        from llama_cpp import Llama

        s = self.settings
        try:
            llm = Llama(
                model_path=str(s.model_path),
                n_ctx=n_ctx,
                n_threads=s.n_threads,
                n_gpu_layers=s.n_gpu_layers,
                flash_attn=s.flash_attn,
                chat_format=s.chat_format,
                seed=s.seed if s.seed >= 0 else RANDOM_SEED,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"Cannot load model {s.model_path}: {exc}. Set QUILL_MODEL_PATH to a valid GGUF file."
            ) from exc
        log.info(
            "model loaded: %s (n_ctx=%d, n_gpu_layers=%d, flash_attn=%s, chat_format=%s)",
            s.model_path.name,
            llm.n_ctx(),
            s.n_gpu_layers,
            s.flash_attn,
            llm.chat_format,
        )
        return llm

    def _worker(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve()
        finally:
            if self._embedder is not None:
                self._embedder.close()

    def _open(self) -> None:
        """Load the model (in the worker thread, its only user)."""
        self._llm = self._load(self.settings.n_ctx)
        self.n_ctx = self._llm.n_ctx()

    def _serve(self) -> None:
        """Run the queued jobs one after another until `close`."""
        while (job := self._jobs.get()) is not None:
            if not job.cancelled.is_set():
                self._run_job(job)

    def _run_job(self, job: _Job) -> None:
        """Run one job's generator on the model, sending its items back as they come."""
        assert job.work is not None
        items = job.work(self._llm)
        try:
            for item in items:
                if job.cancelled.is_set():
                    break
                job.emit("item", item)
            job.emit("done", None)
        except Exception as exc:
            log.exception("engine job failed")
            job.emit("error", exc)
        finally:
            items.close()

    async def _run(self, work: Callable[[Any], Iterator[Any]] | None, request: Any = None) -> AsyncIterator[Any]:
        """Queue `work` (or a `request` the worker schedules) and yield what it produces;
        leaving early cancels it."""
        if self._thread is None:
            raise EngineError(Text("The model engine is not running."))
        job = _Job(work, asyncio.get_running_loop(), request=request)
        self._jobs.put(job)
        try:
            while True:
                kind, value = await job.out.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            job.cancelled.set()

    # -- LoRA hot swap ---------------------------------------------------------------------

    async def set_adapter(self, path: Path | None) -> None:
        """Serve with the LoRA adapter at `path` (None: the base model) from the next request on.

        It runs as a worker job, so it falls between two generations: queued requests wait
        their turn as usual and none is dropped."""

        def work(llm: Any) -> Iterator[None]:
            self._swap_adapter(llm, path)
            yield None

        async for _ in self._run(work):
            pass

    async def forget_states(self, tags: Collection[str] | None = None) -> int:
        """Single mode keeps one state, the prompt `Llama` evaluated last, and no tags for it:
        drop it whatever was erased."""

        def work(llm: Any) -> Iterator[None]:
            llm.reset()
            yield None

        async for _ in self._run(work):
            pass
        return 1

    def _swap_adapter(self, llm: Any, path: Path | None) -> None:
        path = path.resolve() if path is not None else None
        attach_lora(llm.ctx, llm._model.model, self._adapters, path)
        # The prompt cache holds KV computed with the previous weights: a reused prefix would
        # answer with the old adapter. Start the next request from scratch.
        llm.reset()
        self.adapter = path
        log.info("LoRA adapter now %s", path or "none (base model)")

    # -- requests --------------------------------------------------------------------------

    async def count_tokens(self, text: str) -> int:
        """Tokenize off the event loop. Tokenizing reads only the vocabulary, never the context,
        so it need not wait behind a generation in the worker queue."""
        if self._llm is None:
            raise EngineError(Text("The model engine is not running."))
        data = text.encode("utf-8", errors="replace")
        return len(await asyncio.to_thread(self._llm.tokenize, data, False, False))

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled embeddings from a second context on the same weights, made and used only
        in the worker thread (the model's single owner)."""

        def work(llm: Any) -> Iterator[list[list[float]]]:
            if self._embedder is None:
                self._embedder = Embedder(llm)
            yield self._embedder.embed(texts)

        vectors: list[list[float]] = []
        async for item in self._run(work):
            vectors = item
        return vectors

    def _generate(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[Any]:
        payload = [m.as_dict() for m in messages]

        def work(llm: Any) -> Iterator[str | _Finish]:
            prefilled = Prefilled(llm, options.prefix)
            prompt_tokens = sum(
                len(llm.tokenize(m["content"].encode("utf-8", "replace"), False, False)) + MESSAGE_OVERHEAD_TOKENS
                for m in payload
            ) + len(prefilled.prefix)
            room = reply_room(prompt_tokens, llm.n_ctx())
            kwargs: dict[str, Any] = {
                "messages": payload,
                "max_tokens": min(options.max_tokens, room),
                "temperature": options.temperature,
                "stop": list(options.stop) or None,
                "stream": True,
            }
            if self.settings.seed < 0:
                # Llama derives each call's seed from the last one, starting from the seed it was
                # made with: every process would give the same replies. -1 means random.
                kwargs["seed"] = random.randrange(RANDOM_SEED)
            if options.grammar:
                from llama_cpp import LlamaGrammar

                kwargs["grammar"] = LlamaGrammar.from_string(options.grammar, verbose=False)
            if options.json_schema is not None:
                kwargs["response_format"] = {"type": "json_object", "schema": options.json_schema}
            chunks = prefilled.chat(**kwargs)
            text, reason = [], None
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    delta = choice["delta"].get("content")
                    if delta:
                        text.append(delta)
                        yield delta
                    reason = choice.get("finish_reason") or reason
            finally:
                chunks.close()
            completion = "".join(text).encode("utf-8", "replace")
            yield _Finish(reason, len(llm.tokenize(completion, False, False)))

        return self._run(work)

    async def stream(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[str]:
        async for item in self._generate(messages, options):
            if isinstance(item, str):
                yield item

    async def chat(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> ChatResult:
        parts: list[str] = []
        finish = _Finish(None, 0)
        async for item in self._generate(messages, options):
            if isinstance(item, str):
                parts.append(item)
            else:
                finish = item
        return ChatResult("".join(parts), finish.completion_tokens, finish.reason)

    async def chat_structured(
        self, messages: Sequence[ChatMessage], model: type[Model], options: GenerationOptions
    ) -> Model:
        return await structured_chat(self, messages, model, options)
