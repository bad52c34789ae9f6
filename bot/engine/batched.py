"""The in-process backend that serves many conversations at once (QUILL_ENGINE_MODE=batched).

Same shape as `LocalEngine` (one worker thread owns the model, a queue feeds it, the async side
is shared), but the worker schedules instead of running one job at a time:

- **Continuous batching.** One llama.cpp context holds many sequences. Every step decodes one
  token of each running reply in a single `llama_decode`, plus a chunk of at most
  `QUILL_BATCH_PREFILL_CHUNK` prompt tokens of newly admitted requests, so a long prompt never
  freezes the replies already streaming. Requests are admitted in arrival order (a request that
  does not fit yet holds the ones behind it, so none starves); a finished or cancelled one leaves
  at once.
- **Warm prefixes.** The engine sees only message lists, so conversations are matched by
  tokens. When a reply finishes, its sequence's KV state is saved to host memory
  (`llama_state_seq_get_data`) and its cells are freed; a new request restores the saved state
  with the longest common token prefix into its sequence (`llama_state_seq_set_data`, a copy of
  about 23 KB a token for SmolLM2-135M) and evaluates only the rest. Saved states are dropped
  least recently used first beyond `QUILL_BATCH_CACHE_MB`. The KV pool so holds only running
  replies: idle conversations left in it would widen every step's attention window and slow
  the running ones down (measured: a lone reply at 0.78x after 8 conversations stayed).
- **Same results as single mode.** The prompt comes from `Llama`'s own chat handler, sampling
  from llama.cpp sampler chains built like `Llama`'s, stop sequences are cut from the
  detokenized text like `Llama.create_completion` does.
"""

from __future__ import annotations

import ctypes
import logging
import queue
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format
from llama_cpp.llama_grammar import LLAMA_GRAMMAR_DEFAULT_ROOT

from bot.config import Settings
from bot.engine import ChatMessage, ContextOverflow, EngineError, GenerationOptions
from bot.engine.contexts import fill_batch, new_context
from bot.engine.local import LocalEngine, _Finish, _Job, attach_lora

log = logging.getLogger(__name__)

# The `Llama` object is kept for its tokenizer and chat template; its own small context is unused
# by generation (tests score tokens with it).
TOKENIZER_CONTEXT = 512
# A shorter common beginning (a chat template's first tokens) is not worth restoring.
MIN_SHARED_PREFIX = 16
# Sampling settings `Llama.create_chat_completion` uses by default (single mode).
TOP_K, TOP_P, MIN_P, TYPICAL_P = 40, 0.95, 0.05, 1.0


@dataclass(frozen=True)
class _Generate:
    messages: tuple[ChatMessage, ...]
    options: GenerationOptions


@dataclass(frozen=True)
class _SwapAdapter:
    path: Path | None


@dataclass
class BatchStats:
    """Counters the tests and benchmarks read (the worker writes them)."""

    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    tokens_generated: int = 0
    evictions: int = 0  # saved states dropped for the memory budget
    cancellations: int = 0
    restores: int = 0  # saved states copied back into a sequence
    running: int = 0  # sequences decoding now
    free: int = 0  # sequence ids unused
    sequences: int = 0  # running + free, always
    warm: int = 0  # conversations saved for their prefix
    warm_tokens: int = 0  # tokens those states hold
    warm_bytes: int = 0  # host memory they take (QUILL_BATCH_CACHE_MB bounds it)
    steps: int = 0
    mixed_steps: int = 0  # steps that decoded running replies and prefilled a prompt together
    kv_cells: int = 0
    kv_bytes_per_token: int = 0


@dataclass(eq=False)
class _Saved:
    """An idle conversation: the tokens its state holds, and the state (host memory)."""

    tokens: list[int]
    state: Any  # a ctypes byte array from llama_state_seq_get_data


@dataclass(eq=False)
class _Sequence:
    """A running request: its sequence id, what is in the KV cache, its sampler and output."""

    job: _Job
    seq_id: int
    prompt: list[int]
    kv: list[int]  # tokens evaluated in this sequence, in position order
    max_tokens: int
    stops: list[bytes]
    sampler: Any
    reserve: int  # cells this sequence may come to use: prompt + max_tokens
    completion: list[int] = field(default_factory=list)
    pending: int | None = None  # the token sampled last, evaluated at the next step
    sent: int = 0  # bytes of the detokenized completion already emitted

    @property
    def prefilling(self) -> bool:
        return len(self.kv) < len(self.prompt)


class _PromptCapture:
    """Stands in for `Llama` inside its own chat handler and keeps the completion request the
    handler would run: the prompt tokens, stop strings and grammar, exactly as in single mode."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.request: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, **kwargs: Any) -> Any:
        self.request = kwargs
        return iter(())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def complete_utf8(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the start byte of the last character
            size = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return len(data) if size <= back else len(data) - back
    return len(data)


def held_back(text: bytes, stops: Sequence[bytes]) -> int:
    """How many trailing bytes of `text` could be the start of a stop sequence."""
    longest = 0
    for stop in stops:
        for i in range(min(len(stop), len(text)), longest, -1):
            if text.endswith(stop[:i]):
                longest = i
                break
    return longest


class BatchedEngine(LocalEngine):
    """The in-process backend with continuous batching and warm prefixes per conversation."""

    features = frozenset({"stream", "grammar", "json_schema", "tokenize", "embeddings", "lora"})

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stats = BatchStats()
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._n_cells = 0
        self._n_seq = settings.batch_streams
        self._chunk = settings.batch_prefill_chunk
        self._pending: deque[_Job] = deque()
        self._active: list[_Sequence] = []
        self._saved: OrderedDict[int, _Saved] = OrderedDict()  # idle conversations, oldest first
        self._saved_key = 0
        self._free_ids: list[int] = []
        self._adapters: dict[Path, Any] = {}
        self._stopping = False

    # -- worker side: setup ----------------------------------------------------------------

    def _open(self) -> None:
        s = self.settings
        self._llm = self._load(TOKENIZER_CONTEXT)
        self.n_ctx = s.n_ctx
        model = self._llm._model.model
        n_head = llama_cpp.llama_model_n_head(model)
        kv_width = llama_cpp.llama_model_n_embd(model) // n_head * llama_cpp.llama_model_n_head_kv(model)
        per_token = llama_cpp.llama_model_n_layer(model) * 2 * kv_width * 2  # K and V, f16
        cells = max(s.n_ctx, s.batch_kv_mb * 2**20 // per_token)
        self._n_cells = -(-cells // 256) * 256
        n_batch = self._chunk + s.batch_streams
        self._ctx = new_context(self._llm, n_ctx=self._n_cells, n_batch=n_batch, n_seq_max=self._n_seq)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._free_ids = list(range(self._n_seq))
        self.stats.kv_cells, self.stats.kv_bytes_per_token = self._n_cells, per_token
        self.stats.sequences = self._n_seq
        self._update_gauges()
        log.info(
            "batched engine: %d KV cells (%d MB), %d streams, prefill chunk %d, %d MB for saved conversations",
            self._n_cells,
            self._n_cells * per_token // 2**20,
            self._n_seq,
            self._chunk,
            s.batch_cache_mb,
        )

    def _serve(self) -> None:
        try:
            while not self._stopping:
                self._intake()
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
        finally:
            stopped = EngineError("The model engine stopped.")
            for seq in self._active:
                seq.job.emit("error", stopped)
                llama_cpp.llama_sampler_free(seq.sampler)
            for job in self._pending:
                job.emit("error", stopped)
            for adapter in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(adapter)
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)

    # -- worker side: scheduling -----------------------------------------------------------

    def _intake(self) -> None:
        """Move queued jobs to the pending line; wait for one when there is nothing to do."""
        block = not self._active and not self._pending
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
                return
            self._pending.append(job)
            block = False

    def _drop_cancelled(self) -> None:
        self._pending = deque(j for j in self._pending if not j.cancelled.is_set())
        for seq in [s for s in self._active if s.job.cancelled.is_set()]:
            self._release(seq, keep=False)
            self.stats.cancellations += 1

    def _admit(self) -> None:
        """Start pending requests in arrival order while there is room; stop at the first that
        must wait, so nothing behind it overtakes it."""
        while self._pending and not self._stopping:
            job = self._pending[0]
            if isinstance(job.request, _SwapAdapter):
                if self._active:
                    return  # requests already running finish with the adapter they began with
                self._pending.popleft()
                self._finish_job(job, self._swap_adapter, job.request.path)
            elif job.request is None:
                self._pending.popleft()
                self._run_job(job)  # e.g. embeddings: another context, no need to wait
            else:
                if len(self._active) >= self.settings.batch_streams:
                    return
                try:
                    started = self._start(job)
                except Exception as exc:
                    self._pending.popleft()
                    if not isinstance(exc, EngineError):
                        log.exception("could not start a request")
                    job.emit("error", exc)
                    continue
                if not started:
                    return
                self._pending.popleft()

    def _finish_job(self, job: _Job, action: Any, *args: Any) -> None:
        try:
            action(*args)
            job.emit("done", None)
        except Exception as exc:
            log.exception("engine job failed")
            job.emit("error", exc)

    def _start(self, job: _Job) -> bool:
        """Admit one request: restore the saved conversation sharing the longest prefix into a
        free sequence. False when running requests leave no room for it yet."""
        request: _Generate = job.request
        prompt, stops, grammar = self._format(request)
        room = self.n_ctx - len(prompt)
        if room < 16:
            raise ContextOverflow(
                f"The prompt takes {len(prompt)} tokens; the model's context holds {self.n_ctx} (QUILL_N_CTX)."
            )
        max_tokens = min(request.options.max_tokens, room)
        reserve = len(prompt) + max_tokens
        used = sum(s.reserve for s in self._active)
        if used + reserve > self._n_cells:
            return False
        seq_id = self._free_ids.pop()
        shared = self._restore(seq_id, prompt, room=self._n_cells - used)
        sampler = self._sampler(request.options, grammar)
        self._active.append(_Sequence(job, seq_id, prompt, prompt[:shared], max_tokens, stops, sampler, reserve))
        self.stats.prompt_tokens_reused += shared
        self._update_gauges()
        return True

    def _restore(self, seq_id: int, prompt: list[int], room: int) -> int:
        """Copy the saved state sharing the longest prefix with `prompt` into `seq_id` and cut
        it there; how many prompt tokens it covers (0: evaluate all)."""
        source, shared = None, 0
        for key, saved in self._saved.items():
            n = common_prefix(saved.tokens, prompt)
            if n > shared:
                source, shared = key, n
        shared = min(shared, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if source is None or shared < MIN_SHARED_PREFIX:
            return 0
        saved = self._saved[source]
        if len(saved.tokens) > room:  # the whole state must fit before its tail is cut
            return 0
        self._saved.move_to_end(source)
        if not llama_cpp.llama_state_seq_set_data(self._ctx, saved.state, len(saved.state), seq_id):
            log.warning("could not restore a saved conversation (%d tokens); evaluating it", len(saved.tokens))
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            return 0
        llama_cpp.llama_memory_seq_rm(self._mem, seq_id, shared, -1)
        self.stats.restores += 1
        return shared

    def _release(self, seq: _Sequence, *, keep: bool) -> None:
        """A request leaves, its sequence id freed at once; its state is first saved to host
        memory (`keep`) for the conversation's next turn."""
        self._active.remove(seq)
        llama_cpp.llama_sampler_free(seq.sampler)
        if keep and seq.kv:
            self._save(seq)
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        self._free_ids.append(seq.seq_id)
        self._update_gauges()

    def _save(self, seq: _Sequence) -> None:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq.seq_id)
        budget = self.settings.batch_cache_mb * 2**20
        if size > budget:
            return
        state = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, state, size, seq.seq_id) != size:
            log.warning("could not save a conversation's state; its next turn is evaluated in full")
            return
        # Saved states this one extends hold nothing it does not: drop them.
        for key, saved in list(self._saved.items()):
            if len(saved.tokens) <= len(seq.kv) and seq.kv[: len(saved.tokens)] == saved.tokens:
                del self._saved[key]
        self._saved_key += 1
        self._saved[self._saved_key] = _Saved(list(seq.kv), state)
        total = sum(len(s.state) for s in self._saved.values())
        while total > budget:
            _, dropped = self._saved.popitem(last=False)
            total -= len(dropped.state)
            self.stats.evictions += 1

    def _update_gauges(self) -> None:
        self.stats.running, self.stats.free = len(self._active), len(self._free_ids)
        self.stats.warm = len(self._saved)
        self.stats.warm_tokens = sum(len(s.tokens) for s in self._saved.values())
        self.stats.warm_bytes = sum(len(s.state) for s in self._saved.values())

    # -- worker side: one step -------------------------------------------------------------

    def _step(self) -> None:
        """One `llama_decode`: the next token of every running reply plus prompt chunks."""
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Sequence, int]] = []
        for seq in self._active:
            if seq.pending is not None:
                entries.append((seq.pending, len(seq.kv), seq.seq_id, True))
                outputs.append((seq, len(entries) - 1))
                seq.kv.append(seq.pending)
                seq.pending = None
        decoding = bool(entries)
        budget = self._chunk
        for seq in self._active:
            if budget == 0:
                break
            if seq.prefilling:
                start = len(seq.kv)
                chunk = seq.prompt[start : start + budget]
                for i, token in enumerate(chunk):
                    last = start + i == len(seq.prompt) - 1
                    entries.append((token, start + i, seq.seq_id, last))
                    if last:
                        outputs.append((seq, len(entries) - 1))
                seq.kv.extend(chunk)
                budget -= len(chunk)
                self.stats.prompt_tokens_evaluated += len(chunk)
        self.stats.steps += 1
        self.stats.mixed_steps += decoding and budget < self._chunk
        if not self._decode(entries):
            return
        for seq, index in outputs:
            token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, index)
            self.stats.tokens_generated += 1
            self._on_token(seq, token)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> bool:
        fill_batch(self._batch, entries)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == 0:
            return True
        error = EngineError(f"The model could not evaluate the batch (llama_decode returned {rc}).")
        for seq in {self._seq_of(seq_id) for _, _, seq_id, _ in entries}:
            self._release(seq, keep=False)
            seq.job.emit("error", error)
        return False

    def _seq_of(self, seq_id: int) -> _Sequence:
        return next(s for s in self._active if s.seq_id == seq_id)

    def _on_token(self, seq: _Sequence, token: int) -> None:
        """Emit what the new token makes safe to show; end the reply on EOG, stop or length."""
        if llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token):
            self._finish(seq, "stop", self._llm.detokenize(seq.completion))
            return
        seq.completion.append(token)
        text = self._llm.detokenize(seq.completion)
        hits = [text.index(stop) for stop in seq.stops if stop in text]
        if hits:
            self._finish(seq, "stop", text[: min(hits)])
            return
        if len(seq.completion) >= seq.max_tokens:
            self._finish(seq, "length", text)
            return
        safe = complete_utf8(text[: len(text) - held_back(text, seq.stops)])
        if safe > seq.sent:
            seq.job.emit("item", text[seq.sent : safe].decode("utf-8", "ignore"))
            seq.sent = safe
        seq.pending = token

    def _finish(self, seq: _Sequence, reason: str, text: bytes) -> None:
        self._release(seq, keep=True)  # first: whoever hears "done" finds the sequence free
        # A reply cut mid-character (max_tokens) ends before it; bytes that are no UTF-8 at all
        # are dropped, as `Llama` does (errors="ignore"): never a U+FFFD on screen.
        end = complete_utf8(text)
        if end > seq.sent:
            seq.job.emit("item", text[seq.sent : end].decode("utf-8", "ignore"))
        seq.job.emit("item", _Finish(reason, len(seq.completion)))
        seq.job.emit("done", None)

    # -- worker side: requests -------------------------------------------------------------

    def _format(self, request: _Generate) -> tuple[list[int], list[bytes], str | None]:
        """Prompt tokens, stop strings and grammar, from `Llama`'s own chat handler."""
        llm = self._llm
        handler = (
            llm.chat_handler
            or llm._chat_handlers.get(llm.chat_format)
            or llama_chat_format.get_chat_completion_handler(llm.chat_format)
        )
        options = request.options
        capture = _PromptCapture(llm)
        kwargs: dict[str, Any] = {"stop": list(options.stop) or None}
        if options.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": options.json_schema}
        handler(llama=capture, messages=[m.as_dict() for m in request.messages], stream=True, **kwargs)
        captured = capture.request
        stops = [s.encode("utf-8") for s in captured.get("stop") or []]
        grammar = captured.get("grammar")
        # A JSON schema wins over a grammar, as in single mode.
        gbnf = grammar._grammar if grammar is not None else options.grammar
        return list(captured["prompt"]), stops, gbnf

    def _sampler(self, options: GenerationOptions, grammar: str | None) -> Any:
        """A llama.cpp sampler chain built like `Llama`'s for the same options."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if grammar is not None:
            vocab = self._llm._model.vocab
            grammar_sampler = llama_cpp.llama_sampler_init_grammar(
                vocab, grammar.encode("utf-8"), LLAMA_GRAMMAR_DEFAULT_ROOT.encode()
            )
            if not grammar_sampler:
                llama_cpp.llama_sampler_free(chain)
                raise EngineError("The grammar could not be parsed.")
            add(chain, grammar_sampler)
        if options.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = self.settings.seed if self.settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED
            add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(chain, llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(TOP_P, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(options.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _swap_adapter(self, path: Path | None) -> None:
        """Attach `path` (or none); every saved state was computed with the old adapter, so
        all are dropped."""
        path = path.resolve() if path is not None else None
        attach_lora(self._ctx, self._llm._model.model, self._adapters, path)
        self.adapter = path
        self._saved.clear()
        self._update_gauges()

    # -- async side ------------------------------------------------------------------------

    def _generate(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[Any]:
        return self._run(None, _Generate(tuple(messages), options))

    async def set_adapter(self, path: Path | None) -> None:
        async for _ in self._run(None, _SwapAdapter(Path(path) if path is not None else None)):
            pass
