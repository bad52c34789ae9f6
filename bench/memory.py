"""Peak memory: the whole bot (all plugins loaded, one reply generated) against the model file
and against a bare Python process that loads only the model with llama-cpp-python.

    python -m bench.memory

Target: peak RSS <= model file + 300 MB. Each side runs in a child process of its own.
"""

from __future__ import annotations

import subprocess
import sys

BARE = """
import llama_cpp, resource
from bot.config import Settings
s = Settings(_env_file=None)
llm = llama_cpp.Llama(model_path=str(s.model_path), n_ctx=s.n_ctx, n_threads=2, flash_attn=s.flash_attn, verbose=False)
llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BOT = """
import asyncio, resource, sys
from bench.common import bench_settings, start_app
from bot.api import Request

async def main():
    app = await start_app(bench_settings(max_reply_tokens=32, engine_mode=sys.argv[1]))
    reply = await app.router.handle(Request(transport="bench", channel_id="m", author_id="b", text="Hello"))
    if reply.stream is not None:
        async for _ in reply.stream:
            pass
    print(sorted(name for name, _ in app.plugins.list_name_plugin()), file=sys.stderr)
    await app.close()

asyncio.run(main())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mb(code: str, *args: str) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024, done.stderr.strip()


def main() -> int:
    from bot.config import Settings

    model = Settings(_env_file=None).model_path
    model_mb = model.stat().st_size / 2**20
    bare, _ = peak_mb(BARE)
    print(f"model file: {model.name}, {model_mb:.0f} MB")
    print(f"peak RSS, bare llama-cpp-python: {bare:7.0f} MB")
    for mode in ("single", "batched"):
        bot, plugins = peak_mb(BOT, mode)
        print(f"peak RSS, quill ({mode} mode, all plugins): {bot:7.0f} MB")
        print(f"  quill - model file: {bot - model_mb:.0f} MB (target <= 300 MB); quill - bare: {bot - bare:.0f} MB")
    print(f"plugins loaded: {plugins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
