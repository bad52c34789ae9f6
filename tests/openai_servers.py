"""OpenAI-compatible servers for the server backend's tests (and the bench): the real
llama-cpp-python server and llama.cpp's own `llama-server` as child processes, and a small
scripted one that misbehaves on demand (HTTP 429/503, a hang, a connection dropped mid-stream,
an unknown model)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bot.config import embedded_model_path

BUILD_SCRIPT = Path(__file__).parent.parent / "bench" / "build_llama_server.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChildServer:
    """A server as a child process on a loopback port of its own, its output in a log file."""

    args: list[str]
    health: str  # a URL that answers once the model is loaded

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        """Start it and wait until it answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.ready(httpx.get(self.health, timeout=2.0)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.args[0]} did not start: {self.log_path.read_text()[-2000:]}")

    def ready(self, response: httpx.Response) -> bool:
        """Whether `health`'s answer says the server is ready: a 200 (a loading model is a 503)."""
        return response.status_code == 200

    def kill(self) -> None:
        """Stop it at once, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class LlamaCppServer(ChildServer):
    """`python -m llama_cpp.server` on the embedded model.

    `--interrupt_requests false`: by default that server cuts a running stream short whenever
    another request arrives, which a bot serving several people must not allow."""

    def __init__(
        self, log_path: Path, *, embedding: bool = False, n_ctx: int = 2048, models: list[dict[str, Any]] | None = None
    ) -> None:
        """`models`: several models by alias (its config file's entries; the first is the
        default), loaded in turn as requests name them; else the embedded model alone."""
        super().__init__(log_path)
        self.health = f"{self.url}/models"
        self.args = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(embedded_model_path()),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(n_ctx), "--n_threads", "2",
            "--interrupt_requests", "false",
            "--embedding", str(embedding).lower(),
        ]  # fmt: skip
        if models is not None:
            config = log_path.with_suffix(".json")
            server = {"host": "127.0.0.1", "port": self.port, "interrupt_requests": False}
            config.write_text(json.dumps({**server, "models": [{"n_threads": 2, **m} for m in models]}))
            self.args = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)]


def built_llama_server() -> Path | None:
    """The `llama-server` binary bench/build_llama_server.sh left in its cache, if any
    (`--probe` builds nothing)."""
    probe = subprocess.run(["bash", str(BUILD_SCRIPT), "--probe"], capture_output=True, text=True)
    return Path(probe.stdout.strip()) if probe.returncode == 0 else None


class LlamaServer(ChildServer):
    """llama.cpp's own `llama-server` on the embedded model. `args`: its flags beyond the model,
    port and threads (`--parallel 8 -c 16384`, `--jinja`, `--embeddings`, ...)."""

    def __init__(self, binary: Path, log_path: Path, *args: str, threads: int = 2) -> None:
        super().__init__(log_path)
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.health = f"{self.root_url}/health"
        self.args = [str(binary), "-m", str(embedded_model_path()), "--host", "127.0.0.1", "--port", str(self.port)]
        self.args += ["-t", str(threads), "--no-webui", *args]


Behaviour = Callable[["ScriptedHandler", dict[str, Any]], None]


class ScriptedServer(ThreadingHTTPServer):
    """An OpenAI-compatible server whose chat answers are scripted per test (`chat`).

    It lists `models` at /v1/models (None: no such endpoint) and offers nothing else: no
    grammar, response_format, tokenizer or embeddings. Every request's path goes to `hits`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.models: list[str] | None = ["fake-model"]
        self.chat: Behaviour = answer
        self.hits: list[str] = []
        self.bodies: list[dict[str, Any]] = []  # every chat request's body, in order
        self.authorization: str | None = None  # the last request's Authorization header
        self.release = threading.Event()  # ends a `hang`
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows the test's own output."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        if self.path == "/v1/models" and self.server.models is not None:
            self.send_json(200, {"object": "list", "data": [{"id": m} for m in self.server.models]})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        self.server.hits.append(self.path)
        self.server.authorization = self.headers.get("Authorization")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/v1/chat/completions":
            self.server.bodies.append(body)
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"detail": "Not Found"})
        elif "response_format" in body:
            self.send_json(400, {"error": {"message": "response_format is not supported"}})
        else:
            self.server.chat(self, body)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, data: Any) -> None:
        line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def send_pieces(self, pieces: list[str], finish: str | None) -> None:
        for piece in pieces:
            self.send_event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        if finish is not None:
            self.send_event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})


def answer(handler: ScriptedHandler, body: dict[str, Any]) -> None:
    """A well-formed streamed reply."""
    handler.start_events()
    handler.send_pieces(["Hello", " there."], "stop")
    handler.send_event("[DONE]")
    handler.wfile.write(b"0\r\n\r\n")


def busy(status: int, times: int, retry_after: str | None = None) -> Behaviour:
    """Answer HTTP `status` to the first `times` chat requests, then answer normally."""
    left = [times]

    def behave(handler: ScriptedHandler, body: dict[str, Any]) -> None:
        if left[0] <= 0:
            return answer(handler, body)
        left[0] -= 1
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        handler.send_json(status, {"error": {"message": "server busy, try later"}}, headers)

    return behave


def hang(handler: ScriptedHandler, body: dict[str, Any]) -> None:
    """Accept the request and say nothing until the test ends."""
    handler.server.release.wait(30)
    handler.close_connection = True


def cut_off(handler: ScriptedHandler, body: dict[str, Any]) -> None:
    """Start the reply, then drop the connection as a crashed server would."""
    handler.start_events()
    handler.send_pieces(["Once", " upon"], None)
    handler.close_connection = True


def interrupted(handler: ScriptedHandler, body: dict[str, Any]) -> None:
    """End the stream cleanly but unfinished, as llama-cpp-python's server does by default
    when another request arrives."""
    handler.start_events()
    handler.send_pieces(["Once", " upon"], None)
    handler.send_event("[DONE]")
    handler.wfile.write(b"0\r\n\r\n")


def unknown_model(handler: ScriptedHandler, body: dict[str, Any]) -> None:
    """What vLLM answers for a model it does not serve."""
    message = f"The model `{body.get('model')}` does not exist."
    handler.send_json(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})


def with_tools(decisions: list[tuple[str, dict[str, Any]] | None]) -> Behaviour:
    """A server that takes OpenAI's `tools` field: the start-up probe (tool_choice "required")
    gets a call of its first tool; each later request offering tools gets the next of
    `decisions` (a tool's name and arguments, or None: no call), streamed in pieces as OpenAI
    streams them; a request without tools gets a plain answer."""
    left = list(decisions)

    def behave(handler: ScriptedHandler, body: dict[str, Any]) -> None:
        tools = body.get("tools")
        if not tools:
            return answer(handler, body)
        if body.get("tool_choice") == "required":
            decision: tuple[str, dict[str, Any]] | None = (tools[0]["function"]["name"], {"ok": True})
        else:
            decision = left.pop(0) if left else None
        if decision is None:
            return answer(handler, body)
        name, arguments = decision
        text = json.dumps(arguments)
        handler.start_events()
        first = {"index": 0, "id": f"call_{len(left)}", "type": "function", "function": {"name": name, "arguments": ""}}
        rest = {"index": 0, "function": {"arguments": text[: len(text) // 2]}}
        last = {"index": 0, "function": {"arguments": text[len(text) // 2 :]}}
        for part in (first, rest, last):
            handler.send_event({"choices": [{"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None}]})
        handler.send_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        handler.send_event("[DONE]")
        handler.wfile.write(b"0\r\n\r\n")

    return behave
