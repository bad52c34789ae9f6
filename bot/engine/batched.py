"""The in-process backend that serves many conversations at once (QUILL_ENGINE_MODE=batched).

Same shape as `LocalEngine` (one worker thread owns the model, a queue feeds it, the async side
is shared), but the worker schedules instead of running one job at a time:

- **Continuous batching.** One llama.cpp context holds many sequences. Every step decodes one
  token of each running reply in a single `llama_decode`, plus a chunk of at most
  `QUILL_BATCH_PREFILL_CHUNK` prompt tokens of newly admitted requests, so a long prompt never
  freezes the replies already streaming. Requests are admitted in arrival order (a request that
  does not fit yet holds the ones behind it, so none starves); a finished or cancelled one leaves
  at once.
- **KV cells on actual use, with preemption.** A request is admitted when the cells its prompt
  needs are free now, not its prompt plus `max_tokens` (most replies end far sooner). When the
  running replies outgrow the pool, the one admitted last is preempted: its state is copied to
  host memory and its cells freed; it resumes, before any new request, as soon as there is room
  again, with its sampler, its text and its place in line kept. If its state cannot be put back
  (no contiguous room), its tokens are evaluated again: slower, never a different reply.
- **Two KV layouts** (QUILL_BATCH_KV). "pool": one cell pool that all sequences share, as
  above; it needs the least memory, but llama.cpp attends over the pool up to its highest used
  cell, so every token pays for every running conversation's cells. "per-stream": each
  sequence has n_ctx cells of its own (llama.cpp's non-unified cache, llama-server's slots): a
  token attends over its own conversation only, a request never waits for cells or is
  preempted, and memory is n_ctx x QUILL_BATCH_STREAMS cells.
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

import bisect
import ctypes
import heapq
import logging
import queue
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import LLAMA_GRAMMAR_DEFAULT_ROOT

from bot.config import Settings
from bot.engine import ChatMessage, ContextOverflow, EngineError, GenerationOptions
from bot.engine.contexts import fill_batch, new_context
from bot.engine.kvstore import DiskState, StateStore, matches, state_key
from bot.engine.local import LocalEngine, Prefilled, _Finish, _Job, attach_lora
from bot.types import Text

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


@dataclass(frozen=True)
class _ForgetStates:
    tags: frozenset[str] | None  # None: every state


@dataclass
class BatchStats:
    """Counters the tests and benchmarks read (the worker writes them)."""

    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    tokens_generated: int = 0
    evictions: int = 0  # saved states dropped for the memory budget
    cancellations: int = 0
    preemptions: int = 0  # running requests parked in host memory because the KV pool was full
    recomputed: int = 0  # parked requests whose state could not be restored, evaluated again
    restores: int = 0  # saved states copied back into a sequence
    running: int = 0  # sequences decoding now
    parked: int = 0  # preempted requests waiting for room
    free: int = 0  # sequence ids unused
    sequences: int = 0  # running + free, always
    warm: int = 0  # conversations saved for their prefix
    warm_tokens: int = 0  # tokens those states hold
    warm_bytes: int = 0  # host memory they take (QUILL_BATCH_CACHE_MB bounds it)
    disk_states: int = 0  # states saved on disk for this model and adapter (QUILL_BATCH_DISK_MB)
    disk_writes: int = 0
    disk_restores: int = 0  # restores read from disk (the first turn after a restart)
    steps: int = 0
    mixed_steps: int = 0  # steps that decoded running replies and prefilled a prompt together
    shared_steps: int = 0  # steps that advanced more than one request (decoding or prefilling)
    # Seconds in llama_decode evaluating prompts and generating replies; a mixed step's time is
    # split by its share of tokens (an estimate: a prompt token costs less than a lone decoded one).
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    kv_cells: int = 0
    kv_bytes_per_token: int = 0


@dataclass(eq=False)
class _Saved:
    """An idle conversation: the tokens its state holds, and the state (host memory)."""

    tokens: list[int]
    state: Any  # a ctypes byte array from llama_state_seq_get_data
    tags: frozenset[str] = frozenset()  # whose messages it holds (bot.api state_tags)
    disk: DiskState | None = None  # its copy on disk, if written


@dataclass(eq=False)
class _Sequence:
    """A running (or preempted) request: its sequence id, what is in the KV cache, its sampler
    and output."""

    job: _Job
    arrival: int  # admission order: the last admitted is preempted first
    seq_id: int
    # Tokens to evaluate before sampling: the prompt, or after a preemption whose state could
    # not be restored, every token evaluated so far.
    prompt: list[int]
    kv: list[int]  # tokens evaluated in this sequence, in position order
    max_tokens: int
    stops: list[bytes]
    sampler: Any
    completion: list[int] = field(default_factory=list)
    pending: int | None = None  # the token sampled last, evaluated at the next step
    text: bytearray = field(default_factory=bytearray)  # the completion detokenized, token by token
    sent: int = 0  # bytes of `text` already emitted
    parked: Any = None  # while preempted: its KV state in host memory (None: evaluate again)
    tags: frozenset[str] = frozenset()  # the request's (GenerationOptions.tags)
    keep: bool = True  # False once its messages were erased: its state is not saved

    @property
    def prefilling(self) -> bool:
        return len(self.kv) < len(self.prompt)


class _PromptCapture(Prefilled):
    """Keeps the completion request `Llama`'s chat handler would run instead of running it: the
    prompt tokens (the written prefix included), stop strings and grammar, as in single mode."""

    def __init__(self, llm: Any, prefix: str) -> None:
        super().__init__(llm, prefix)
        self.request: dict[str, Any] = {}

    def create_completion(self, **kwargs: Any) -> Any:
        self.request = self.prefilled(kwargs)
        return iter(())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def complete_utf8(data: bytes | bytearray, end: int | None = None) -> int:
    """Length of the longest prefix of `data[:end]` that does not end inside a UTF-8 character
    (it reads at most 4 bytes, so a growing reply costs nothing per token)."""
    end = len(data) if end is None else end
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the start byte of the last character
            size = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return end if size <= back else end - back
    return end


def held_back(text: bytes | bytearray, stops: Sequence[bytes]) -> int:
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

    features = frozenset({"stream", "grammar", "json_schema", "tokenize", "embeddings", "lora", "prefix", "batch"})

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stats = BatchStats()
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._n_cells = 0  # in the whole cache
        self._stream_cells = 0  # that one sequence may hold
        self._per_stream = settings.batch_kv == "per-stream"
        self._n_seq = settings.batch_streams
        self._chunk = settings.batch_prefill_chunk
        self._pending: deque[_Job] = deque()
        self._active: list[_Sequence] = []  # in admission order
        self._parked: list[_Sequence] = []  # preempted, in admission order: resumed first
        self._arrivals = 0
        self._pieces: dict[int, bytes] = {}  # detokenized pieces by token id
        self._saved: OrderedDict[int, _Saved] = OrderedDict()  # idle conversations, oldest first
        self._saved_key = 0
        self._free_ids: list[int] = []  # a heap: the lowest id first, so running streams stay consecutive
        self._adapters: dict[Path, Any] = {}
        self._stopping = False
        disk = settings.batch_disk_mb * 2**20
        self._store = StateStore(settings.data_dir / "kv", disk) if disk else None

    # -- worker side: setup ----------------------------------------------------------------

    def _open(self) -> None:
        s = self.settings
        self._llm = self._load(TOKENIZER_CONTEXT)
        self.n_ctx = s.n_ctx
        model = self._llm._model.model
        n_head = llama_cpp.llama_model_n_head(model)
        kv_width = llama_cpp.llama_model_n_embd(model) // n_head * llama_cpp.llama_model_n_head_kv(model)
        per_token = llama_cpp.llama_model_n_layer(model) * 2 * kv_width * 2  # K and V, f16
        if self._per_stream:
            self._stream_cells = -(-s.n_ctx // 256) * 256
            self._n_cells = self._stream_cells * self._n_seq
        else:
            cells = max(s.n_ctx, s.batch_kv_mb * 2**20 // per_token)
            self._n_cells = self._stream_cells = -(-cells // 256) * 256
        n_batch = self._chunk + s.batch_streams
        self._ctx = new_context(
            self._llm, n_ctx=self._n_cells, n_batch=n_batch, n_seq_max=self._n_seq, unified=not self._per_stream
        )
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._free_ids = list(range(self._n_seq))
        self.stats.kv_cells, self.stats.kv_bytes_per_token = self._n_cells, per_token
        self.stats.sequences = self._n_seq
        self._open_store()
        self._update_gauges()
        log.info(
            "batched engine: %d KV cells (%d MB, %s), %d streams, prefill chunk %d, %d MB for saved conversations",
            self._n_cells,
            self._n_cells * per_token // 2**20,
            f"{self._stream_cells} a stream" if self._per_stream else "one pool",
            self._n_seq,
            self._chunk,
            s.batch_cache_mb,
        )

    def _open_store(self) -> None:
        """Use the disk folder of the model and adapter served now (none is shared by another)."""
        if self._store is None:
            return
        params = self._llm.context_params
        # Flash attention stores V untransposed: a state saved with it loads only with it.
        layout = f"llama.cpp {llama_cpp.__version__}, K {params.type_k}, V {params.type_v}"
        layout += f", flash attention {params.flash_attn_type}"
        if self._per_stream:  # such a state lists every stream: it loads only into as many
            layout += f", {self._n_seq} streams"
        key = state_key(self.settings.model_path, self.adapter, self._store.root / "hashes.json", layout)
        self._store.open(key)

    def _serve(self) -> None:
        try:
            while not self._stopping:
                self._intake()
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
        finally:
            self._spill_all()
            stopped = EngineError("The model engine stopped.")
            for seq in self._active + self._parked:
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
        for seq in [s for s in self._parked if s.job.cancelled.is_set()]:
            self._parked.remove(seq)
            llama_cpp.llama_sampler_free(seq.sampler)
            self.stats.cancellations += 1
            self._update_gauges()

    def _admit(self) -> None:
        """Resume preempted requests, then start pending ones in arrival order while there is
        room; stop at the first that must wait, so nothing behind it overtakes it."""
        while self._parked:
            if not self._resume(self._parked[0]):
                return
        while self._pending and not self._stopping:
            job = self._pending[0]
            if isinstance(job.request, _ForgetStates):
                self._pending.popleft()
                self._finish_job(job, self._forget_states, job.request.tags)
            elif isinstance(job.request, _SwapAdapter):
                if self._active or self._parked:
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
            result = action(*args)
            if result is not None:
                job.emit("item", result)
            job.emit("done", None)
        except Exception as exc:
            log.exception("engine job failed")
            job.emit("error", exc)

    def _start(self, job: _Job) -> bool:
        """Admit one request: restore the saved conversation sharing the longest prefix into a
        free sequence. False when the cells its prompt needs are not free yet."""
        request: _Generate = job.request
        prompt, stops, grammar = self._format(request)
        room = self.n_ctx - len(prompt)
        if room < 16:
            raise ContextOverflow(
                Text(
                    "The prompt takes {tokens} tokens; the model's context holds {context} (QUILL_N_CTX).",
                    tokens=len(prompt),
                    context=self.n_ctx,
                )
            )
        free = self._room()
        if free < len(prompt) + 1:
            return False
        sampler = self._sampler(request.options, grammar)
        self._arrivals += 1
        seq = _Sequence(job, self._arrivals, -1, prompt, [], min(request.options.max_tokens, room), stops, sampler)
        seq.tags = request.options.tags
        self._place(seq, free)
        return True

    def _room(self) -> int:
        """KV cells free for a request joining now: a free stream's own cells, or the pool less
        what the running sequences hold or are still prefilling toward, and less the cell each
        takes at the next step."""
        if self._per_stream:
            return self._stream_cells if self._free_ids else 0
        return self._n_cells - sum(max(len(s.kv), len(s.prompt)) + 1 for s in self._active)

    def _place(self, seq: _Sequence, free: int) -> None:
        """Give `seq` a free sequence id, fill it from the saved state sharing the longest
        prefix of what it must evaluate, and put it among the running ones in admission order."""
        seq.seq_id = heapq.heappop(self._free_ids)
        shared = self._restore(seq, room=free)
        seq.kv = seq.prompt[:shared]
        self.stats.prompt_tokens_reused += shared
        bisect.insort(self._active, seq, key=lambda s: s.arrival)
        self._update_gauges()

    def _preempt(self, seq: _Sequence) -> None:
        """Park a running request in host memory to free its cells; `_resume` brings it back."""
        self._active.remove(seq)
        seq.parked = self._snapshot(seq.seq_id)
        if seq.parked is None:
            self._forget_kv(seq)
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        heapq.heappush(self._free_ids, seq.seq_id)
        bisect.insort(self._parked, seq, key=lambda s: s.arrival)
        self.stats.preemptions += 1
        self._update_gauges()

    def _resume(self, seq: _Sequence) -> bool:
        """Put a preempted request back when its cells are free; False while they are not."""
        free = self._room()
        needed = len(seq.kv) + 1 if seq.parked is not None else len(seq.prompt) + 1
        if free < needed or not self._free_ids:
            return False
        self._parked.remove(seq)
        state, seq.parked = seq.parked, None
        if state is not None:
            seq.seq_id = heapq.heappop(self._free_ids)
            if llama_cpp.llama_state_seq_set_data(self._ctx, state, len(state), seq.seq_id):
                bisect.insort(self._active, seq, key=lambda s: s.arrival)
                self._update_gauges()
                return True
            # No contiguous run of free cells for it: evaluate its tokens again instead.
            llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            heapq.heappush(self._free_ids, seq.seq_id)
            self._forget_kv(seq)
        self._place(seq, free)
        return True

    def _forget_kv(self, seq: _Sequence) -> None:
        """Make `seq` evaluate everything it had evaluated (and its sampled token) again."""
        if seq.pending is not None:
            seq.prompt, seq.pending = [*seq.kv, seq.pending], None
        seq.kv = []
        self.stats.recomputed += 1

    def _restore(self, seq: _Sequence, room: int) -> int:
        """Copy the saved state (host memory or disk) sharing the longest prefix with the
        prompt into the sequence and cut it there; how many prompt tokens it covers (0:
        evaluate all). What is kept is the prompt's own beginning: the request's tags cover it."""
        prompt = seq.prompt
        source: _Saved | DiskState | None = None
        shared = 0
        on_disk = self._store.states if self._store is not None else []
        for candidate in [*self._saved.values(), *on_disk]:
            n = common_prefix(candidate.tokens, prompt)
            if n > shared:
                source, shared = candidate, n
        shared = min(shared, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if source is None or shared < MIN_SHARED_PREFIX:
            return 0
        if len(source.tokens) > room:  # the whole state must fit before its tail is cut
            return 0
        saved = self._read_back(source) if isinstance(source, DiskState) else source
        if saved is None:
            return 0
        self._saved.move_to_end(next(k for k, v in self._saved.items() if v is saved))
        if not llama_cpp.llama_state_seq_set_data(self._ctx, saved.state, len(saved.state), seq.seq_id):
            log.warning("could not restore a saved conversation (%d tokens); evaluating it", len(saved.tokens))
            llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            return 0
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, shared, -1)
        self.stats.restores += 1
        return shared

    def _read_back(self, disk: DiskState) -> _Saved | None:
        """Read a state from disk back into host memory (None: the file was bad, and is gone)."""
        assert self._store is not None
        data = self._store.read(disk)
        if data is None:
            self._update_gauges()
            return None
        self.stats.disk_restores += 1
        return self._keep(_Saved(disk.tokens, (ctypes.c_uint8 * len(data)).from_buffer(data), disk.tags, disk))

    def _release(self, seq: _Sequence, *, keep: bool) -> None:
        """A request leaves, its sequence id freed at once; its state is first saved to host
        memory (`keep`) for the conversation's next turn."""
        self._active.remove(seq)
        llama_cpp.llama_sampler_free(seq.sampler)
        if keep and seq.keep and seq.kv:
            self._save(seq)
        llama_cpp.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        heapq.heappush(self._free_ids, seq.seq_id)
        self._update_gauges()

    def _snapshot(self, seq_id: int, limit: int | None = None) -> Any:
        """The KV state of `seq_id` copied to host memory; None when it is larger than `limit`
        bytes or llama.cpp could not copy it."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        if limit is not None and size > limit:
            return None
        state = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, state, size, seq_id) != size:
            log.warning("could not copy a sequence's state to host memory; it will be evaluated again")
            return None
        return state

    def _save(self, seq: _Sequence) -> None:
        state = self._snapshot(seq.seq_id, limit=self.settings.batch_cache_mb * 2**20)
        if state is None:
            return
        # Saved states this one extends hold nothing it does not: drop them, on disk too.
        for key, saved in list(self._saved.items()):
            if len(saved.tokens) <= len(seq.kv) and seq.kv[: len(saved.tokens)] == saved.tokens:
                del self._saved[key]
                if saved.disk is not None and self._store is not None:
                    self._store.remove(saved.disk)
        if self._store is not None:
            for disk in [d for d in self._store.states if seq.kv[: len(d.tokens)] == d.tokens]:
                self._store.remove(disk)
        self._keep(_Saved(list(seq.kv), state, seq.tags))

    def _keep(self, saved: _Saved) -> _Saved:
        """Hold `saved` in host memory, the most recently used; the least recently used go
        beyond QUILL_BATCH_CACHE_MB, to disk where QUILL_BATCH_DISK_MB allows."""
        self._saved_key += 1
        self._saved[self._saved_key] = saved
        budget = self.settings.batch_cache_mb * 2**20
        total = sum(len(s.state) for s in self._saved.values())
        while total > budget and len(self._saved) > 1:
            _, dropped = self._saved.popitem(last=False)
            total -= len(dropped.state)
            self._spill(dropped)
            self.stats.evictions += 1
        self._update_gauges()
        return saved

    def _spill(self, saved: _Saved) -> None:
        """Write a state leaving host memory to disk, unless it is there already."""
        if self._store is not None and saved.disk is None:
            saved.disk = self._store.write(saved.tokens, saved.tags, memoryview(saved.state).cast("B"))
            self.stats.disk_writes += saved.disk is not None

    def _spill_all(self) -> None:
        """Write every state in host memory to disk (the engine stops, or the adapter changes)."""
        for saved in self._saved.values():
            self._spill(saved)

    def _forget_states(self, tags: frozenset[str] | None) -> int:
        """Drop the saved states that may hold erased messages (`kvstore.matches`), in host
        memory and on disk, and keep running requests holding them from saving theirs; how
        many states were dropped."""
        dropped = 0
        for key, saved in list(self._saved.items()):
            if matches(saved.tags, tags):
                del self._saved[key]
                if saved.disk is not None and self._store is not None:
                    self._store.remove(saved.disk)
                dropped += 1
        if self._store is not None:
            dropped += self._store.forget(tags)
        for seq in self._active + self._parked:
            if matches(seq.tags, tags):
                seq.keep = False
        self._update_gauges()
        return dropped

    def _update_gauges(self) -> None:
        self.stats.running, self.stats.free = len(self._active), len(self._free_ids)
        self.stats.parked = len(self._parked)
        self.stats.warm = len(self._saved)
        self.stats.warm_tokens = sum(len(s.tokens) for s in self._saved.values())
        self.stats.warm_bytes = sum(len(s.state) for s in self._saved.values())
        self.stats.disk_states = len(self._store.states) if self._store is not None else 0

    # -- worker side: one step -------------------------------------------------------------

    def _step(self) -> None:
        """One `llama_decode`: the next token of every running reply plus prompt chunks, as many
        as the free cells allow. Nothing is recorded as evaluated until the decode succeeded,
        so a step that found no room is simply planned again."""
        self._make_room()
        entries: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Sequence, int]] = []
        # In ascending sequence ids: with a cache per stream, llama.cpp puts only streams of
        # consecutive ids, in that order, into one graph; any other order computes one a stream.
        for seq in sorted(self._active, key=lambda s: s.seq_id):
            if seq.pending is not None:
                entries.append((seq.pending, len(seq.kv), seq.seq_id, True))
                outputs.append((seq, len(entries) - 1))
        decoding = len(entries)
        held = sum(len(s.kv) for s in self._active)
        budget = min(self._chunk, self._n_cells - held - decoding)
        chunks: list[tuple[_Sequence, list[int]]] = []
        for seq in self._active:
            if budget <= 0:
                break
            if seq.prefilling:
                start = len(seq.kv)
                chunk = seq.prompt[start : start + budget]
                for i, token in enumerate(chunk):
                    last = start + i == len(seq.prompt) - 1
                    entries.append((token, start + i, seq.seq_id, last))
                    if last:
                        outputs.append((seq, len(entries) - 1))
                chunks.append((seq, chunk))
                budget -= len(chunk)
        started = time.perf_counter()
        if not entries or not self._decode(entries):
            return
        elapsed = time.perf_counter() - started
        self.stats.generation_seconds += elapsed * decoding / len(entries)
        self.stats.prompt_seconds += elapsed * (len(entries) - decoding) / len(entries)
        self.stats.shared_steps += decoding + len(chunks) > 1
        for seq, _ in outputs[:decoding]:
            seq.kv.append(seq.pending)
            seq.pending = None
        for seq, chunk in chunks:
            seq.kv.extend(chunk)
            self.stats.prompt_tokens_evaluated += len(chunk)
        self.stats.steps += 1
        self.stats.mixed_steps += decoding > 0 and bool(chunks)
        for seq, index in outputs:
            token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, index)
            self.stats.tokens_generated += 1
            self._on_token(seq, token)

    def _make_room(self) -> None:
        """Preempt the last admitted requests until the next step fits in the pool: a cell for
        each running reply's next token (or, when none decodes, one prompt token)."""
        while len(self._active) > 1:
            decoding = sum(s.pending is not None for s in self._active)
            if self._n_cells - sum(len(s.kv) for s in self._active) >= max(decoding, 1):
                return
            self._preempt(self._active[-1])

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> bool:
        fill_batch(self._batch, entries)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == 0:
            return True
        if rc == 1 and len(self._active) > 1:
            # No KV slot for the batch (the free cells are scattered): make room and plan again.
            self._preempt(self._active[-1])
            return False
        error = EngineError(f"The model could not evaluate the batch (llama_decode returned {rc}).")
        for seq in {self._seq_of(seq_id) for _, _, seq_id, _ in entries}:
            self._release(seq, keep=False)
            seq.job.emit("error", error)
        return False

    def _seq_of(self, seq_id: int) -> _Sequence:
        return next(s for s in self._active if s.seq_id == seq_id)

    def _piece(self, token: int) -> bytes:
        """The bytes `token` adds to the text (a piece may be part of a UTF-8 character)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._llm.detokenize([token])
        return piece

    def _on_token(self, seq: _Sequence, token: int) -> None:
        """Emit what the new token makes safe to show; end the reply on EOG, stop or length.
        The text grows by the token's piece and only its new end is searched for stops, so a
        token costs the same at the 500th as at the first."""
        if llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token):
            self._finish(seq, "stop", len(seq.text))
            return
        seq.completion.append(token)
        text = seq.text
        before = len(text)
        text += self._piece(token)
        # A stop found now ends in the new piece: earlier text held none.
        hits = [i for stop in seq.stops if (i := text.find(stop, max(0, before - len(stop) + 1))) >= 0]
        if hits:
            self._finish(seq, "stop", min(hits))
            return
        if len(seq.completion) >= seq.max_tokens:
            self._finish(seq, "length", len(text))
            return
        safe = complete_utf8(text, len(text) - held_back(text, seq.stops))
        if safe > seq.sent:
            seq.job.emit("item", text[seq.sent : safe].decode("utf-8", "ignore"))
            seq.sent = safe
        seq.pending = token

    def _finish(self, seq: _Sequence, reason: str, end: int) -> None:
        """End the reply with `seq.text[:end]`."""
        self._release(seq, keep=True)  # first: whoever hears "done" finds the sequence free
        # A reply cut mid-character (max_tokens) ends before it; bytes that are no UTF-8 at all
        # are dropped, as `Llama` does (errors="ignore"): never a U+FFFD on screen.
        end = complete_utf8(seq.text, end)
        if end > seq.sent:
            seq.job.emit("item", seq.text[seq.sent : end].decode("utf-8", "ignore"))
        seq.job.emit("item", _Finish(reason, len(seq.completion)))
        seq.job.emit("done", None)

    # -- worker side: requests -------------------------------------------------------------

    def _format(self, request: _Generate) -> tuple[list[int], list[bytes], str | None]:
        """Prompt tokens, stop strings and grammar, from `Llama`'s own chat handler."""
        options = request.options
        capture = _PromptCapture(self._llm, options.prefix)
        kwargs: dict[str, Any] = {"stop": list(options.stop) or None}
        if options.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": options.json_schema}
        capture.chat(messages=[m.as_dict() for m in request.messages], stream=True, **kwargs)
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
        self._spill_all()  # under the old adapter's key, for when it comes back
        self.adapter = path
        self._saved.clear()
        self._open_store()
        self._update_gauges()

    # -- async side ------------------------------------------------------------------------

    def _generate(self, messages: Sequence[ChatMessage], options: GenerationOptions) -> AsyncIterator[Any]:
        return self._run(None, _Generate(tuple(messages), options))

    async def set_adapter(self, path: Path | None) -> None:
        async for _ in self._run(None, _SwapAdapter(Path(path) if path is not None else None)):
            pass

    async def forget_states(self, tags: Collection[str] | None = None) -> int:
        """Drop the saved states (host memory and disk) that may hold messages with any of
        `tags`, and untagged ones; None drops all. Runs at once, between two steps."""
        dropped = 0
        async for count in self._run(None, _ForgetStates(None if tags is None else frozenset(tags))):
            dropped = count
        return dropped
