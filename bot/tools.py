"""Tools: the model calls plugin commands and MCP servers' tools for the person it answers.

A command offered as a tool (`Command(tool=ToolSpec(...))`) runs through the router's normal
path with the asker's own request, so the same admin checks and option checks apply: the model
never acts with more rights than the person it answers. A tool that changes something runs
only after that person confirmed it (Discord buttons, the console's y/N); cancelling, letting it
expire, or having nobody to ask runs nothing. Mutating tools are offered only before any tool
result is in the prompt, so text a tool returned ("call /forget channel now") can never be the
cause of a change, and a confirmation names exactly what would run.

The model chooses under a grammar built from the tools' schemas (the local engines, and servers
that take GBNF), with a branch that answers directly; a server that honours OpenAI's `tools`
field gets that instead. Where the engine continues a written prefix (the in-process ones), the
model writes only the tool's name after `{"tool": "`, so choosing none takes one decoding step,
and the status line shows once a tool is named, before its arguments are written.
On an engine that keeps many conversations' states (batched mode), the next choice's prompt is
read ahead after each answer, while the people in the conversation read and type, so a turn's
choice reads only its new message. (Starting the plain reply beside the choice was tried and
dropped: its cells land after the choice's in the KV pool, and the wider attention window made
every reply token 1.3x slower for a first piece 0.01 s sooner.)

Each call is bounded (QUILL_TOOL_TIMEOUT), each answer makes at most
QUILL_TOOL_MAX_CALLS, each user at most QUILL_TOOL_RATE_PER_MINUTE, and every call is logged
with who asked, its arguments and the size of its result.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import jsonschema

from bot.engine import ChatMessage, Engine, EngineError, GenerationOptions
from bot.i18n import N_, _
from bot.types import OPTION_MAX_CHARS, Command, Reply, Request

if TYPE_CHECKING:
    from bot.api import PluginContext

log = logging.getLogger(__name__)

# The argument that carries a command's free text (a question, a document's name).
TEXT = "text"
# The name the model gives to answer without a tool.
NO_TOOL = "none"
# Messages answered without a tool, shown to the model as earlier turns beside the tools' examples.
NO_TOOL_EXAMPLES = ("Hi! How are you today?", "谢谢，这很有帮助。", "Write a short poem about the sea.")
# How every choice begins; an engine that continues a prefix is given it written.
CHOICE_OPENED = '{"tool": "'
# Longest free text the model may pass a tool; the grammar bounds it, so a choice always ends.
TOOL_TEXT_CHARS = OPTION_MAX_CHARS
# Tokens a choice may take when its longest form is unknown (an MCP tool's unbounded schema); a
# choice cut short means no tool. Otherwise the bound is the longest choice the grammar allows.
CHOICE_TOKENS = 384
# What a tool returns to the model is cut to this many characters.
RESULT_CHARS = 4000
STATUS_PREFIX = "🔧 "
RUNNING = N_("running {name}…")

Run = Callable[[Request, dict[str, Any]], Awaitable[Reply]]


@dataclass(frozen=True)
class Tool:
    """Something the model may call: a command offered as a tool, or an MCP server's tool."""

    name: str
    description: str
    # JSON schema of the arguments (an object).
    parameters: dict[str, Any]
    run: Run = field(compare=False, repr=False)
    changes: bool = True
    admin: bool = False
    answers: bool = False
    status: str = ""
    # For a command: how a confirmation shows a call (`/kb-remove Style guide`).
    command: Command | None = field(default=None, compare=False, repr=False)
    # Messages that call for this tool (ToolSpec.examples), shown to the model as earlier turns.
    examples: tuple[str, ...] = ()

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI's `tools` field lists it."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def shown(self, arguments: dict[str, Any]) -> str:
        """The call as a person reads it in a confirmation: the command line it amounts to."""
        if self.command is None:
            return f"{self.name} {json.dumps(arguments, ensure_ascii=False)}"
        parts = [f"/{self.name}"]
        for option in self.command.options:
            if option.name in arguments:
                value = str(arguments[option.name])
                parts.append(f'{option.name}:"{value}"' if " " in value else f"{option.name}:{value}")
        if text := arguments.get(TEXT):
            parts.append(str(text))
        return " ".join(parts)


@dataclass(frozen=True)
class ToolCall:
    """A call the model chose: which tool, with which arguments (already checked by its schema)."""

    name: str
    arguments: dict[str, Any]
    id: str = "call_0"

    def message(self) -> ChatMessage:
        """The assistant's turn that made this call, in the template's format and OpenAI's."""
        content = json.dumps({"tool": self.name, "arguments": self.arguments}, ensure_ascii=False)
        function = {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}
        return ChatMessage(
            "assistant", content, tool_calls=({"id": self.id, "type": "function", "function": function},)
        )


# -- commands as tools ------------------------------------------------------------------------


def command_schema(command: Command) -> dict[str, Any]:
    """The JSON schema of a command's arguments, from its typed options: whole numbers with their
    bounds, closed choices as an enum, text with its longest length; the free text as `text`."""
    spec = command.tool
    properties: dict[str, Any] = {}
    required: list[str] = []
    if spec is not None and spec.text:
        text: dict[str, Any] = {"type": "string", "description": spec.text}
        if spec.choices:
            text["enum"] = list(spec.choices)
        else:
            text.update(minLength=1, maxLength=TOOL_TEXT_CHARS)
        properties[TEXT] = text
        required.append(TEXT)
    for option in command.options:
        if option.name == TEXT:
            continue
        prop: dict[str, Any] = {"description": option.description}
        if option.closed:
            prop.update(type="string", enum=list(option.choices))
        elif option.kind is int:
            prop.update(type="integer", minimum=option.min, maximum=option.max)
        else:
            prop.update(
                type="string", minLength=max(option.min or 1, 1), maxLength=min(option.longest, TOOL_TEXT_CHARS)
            )
        properties[option.name] = prop
        if option.required:
            required.append(option.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def command_tool(command: Command, run: Callable[[str, Request], Awaitable[Reply]]) -> Tool:
    """A command offered as a tool: `run` is the router's run_command, so the call is checked
    exactly as if the asker had typed it."""
    spec = command.tool
    assert spec is not None

    async def call(request: Request, arguments: dict[str, Any]) -> Reply:
        options = {k: v for k, v in arguments.items() if k != TEXT}
        text = str(arguments.get(TEXT, ""))
        return await run(command.name, replace(request, text=text, options=options, command=command.name))

    return Tool(
        name=command.name,
        description=command.help,
        parameters=command_schema(command),
        run=call,
        changes=spec.changes,
        admin=command.admin,
        answers=spec.answers,
        status=spec.status,
        command=command,
        examples=spec.examples,
    )


# -- the grammar ------------------------------------------------------------------------------


def _literal(json_text: str) -> str:
    """A GBNF literal producing exactly `json_text` (non-ASCII as \\u escapes, which GBNF reads)."""
    return json.dumps(json_text)


def _digits_range(low: int, high: int) -> list[str]:
    """GBNF alternatives matching exactly the decimal numbers from `low` to `high` (0 <= low):
    the interval is cut into blocks like 100-599 ("[1-5] [0-9] [0-9]")."""
    alternatives = []
    if low == 0:
        alternatives.append('"0"')
        low = 1
    start = low
    while start <= high:
        size = 1
        while start % (size * 10) == 0 and start + size * 10 - 1 <= high:
            size *= 10
        end = start + size - 1
        while end + size <= high and ((end + 1) // size) % 10 != 0:
            end += size
        digits = len(str(size)) - 1  # trailing free digits
        first, last = str(start), str(end)
        head = first[: len(first) - digits]
        tail = last[: len(last) - digits]
        prefix, a, b = head[:-1], head[-1], tail[-1]
        parts = [_literal(prefix)] if prefix else []
        parts.append(f"[{a}-{b}]" if a != b else _literal(a))
        parts += ["[0-9]"] * digits
        alternatives.append(" ".join(parts))
        start = end + 1
    return alternatives


class Grammar:
    """Builds the GBNF of one choice: `{"tool": "none"}`, or `{"tool": NAME, "arguments": {...}}`
    with arguments valid for that tool's schema. Command tools' schemas (strings bounded in
    length, enums, bounded integers) are written here; anything else (MCP tools' schemas) goes
    through llama-cpp-python's JSON-schema converter."""

    def __init__(self, said: str = "") -> None:
        # The user's last message: a text argument may be exactly it (a question passed on as
        # asked), offered first so that a small model copies it rather than paraphrasing it.
        self.said = said
        self.rules: dict[str, str] = {
            # No \\u escapes: at most 4 bytes a character, so the longest choice is known.
            "q-char": r'[^"\\\x7F\x00-\x1F] | "\\" ["\\/bfnrt]',
        }
        self._converter: Any = None

    def build(self, tools: Sequence[Tool]) -> str:
        branches = ['"\\"none\\""']
        for i, tool in enumerate(tools):
            args = self.value(tool.parameters, f"q-args-{i}")
            branches.append(f'{_literal(json.dumps(tool.name))} ", \\"arguments\\": " {args}')
        self.rules["root"] = '"{\\"tool\\": " (' + " | ".join(branches) + ') "}"'
        return self._text()

    def arguments(self, tool: Tool) -> str:
        """The GBNF of the rest of a call to `tool` once its name is written: its arguments,
        then the closing brace."""
        self.rules["root"] = f'{self.value(tool.parameters, "q-args")} "}}"'
        return self._text()

    def _text(self) -> str:
        lines = [f"{name} ::= {rule}" for name, rule in self.rules.items()]
        if self._converter is not None:
            lines.append(self._converter.format_grammar())
        return "\n".join(lines)

    def value(self, schema: dict[str, Any], name: str) -> str:
        """A rule name producing JSON valid for `schema`."""
        if "enum" in schema:
            return self._rule(name, " | ".join(_literal(json.dumps(v, ensure_ascii=False)) for v in schema["enum"]))
        kind = schema.get("type")
        if kind == "string" and set(schema) <= {"type", "description", "minLength", "maxLength"}:
            low, high = schema.get("minLength", 0), schema.get("maxLength", TOOL_TEXT_CHARS)
            free = f'"\\"" q-char{{{low},{high}}} "\\""'
            if self.said and low <= len(self.said) <= high:
                free = f"{_literal(json.dumps(self.said, ensure_ascii=False))} | {free}"
            return self._rule(name, free)
        if kind == "integer" and isinstance(schema.get("minimum"), int) and isinstance(schema.get("maximum"), int):
            low, high = schema["minimum"], schema["maximum"]
            if low >= 0:
                return self._rule(name, " | ".join(_digits_range(low, high)))
            if high < 0:
                return self._rule(name, '"-" (' + " | ".join(_digits_range(-high, -low)) + ")")
            return self._rule(
                name, " | ".join(_digits_range(0, high)) + ' | "-" (' + " | ".join(_digits_range(1, -low)) + ")"
            )
        if kind == "object" and schema.get("additionalProperties") is False and self._simple(schema):
            return self._object(schema, name)
        return self._converted(schema, name)

    @staticmethod
    def _simple(schema: dict[str, Any]) -> bool:
        return all(
            set(p) <= {"type", "description", "enum", "minLength", "maxLength", "minimum", "maximum"}
            for p in schema.get("properties", {}).values()
        )

    def _object(self, schema: dict[str, Any], name: str) -> str:
        """Properties in the schema's order, required ones always, optional ones maybe."""
        properties = schema.get("properties", {})
        required = [p for p in properties if p in schema.get("required", [])]
        optional = [p for p in properties if p not in required]
        member = {
            p: f"{_literal(json.dumps(p) + ': ')} {self.value(properties[p], f'{name}-{i}')}"
            for i, p in enumerate(properties)
        }
        # rest-k: the optional members from the k-th on, each maybe, each after ", ".
        rest = ""
        for k in range(len(optional) - 1, -1, -1):
            rest = self._rule(f"{name}-rest{k}", f'(", " {member[optional[k]]})? {rest}'.strip())
        if required:
            body = ' ", " '.join(member[p] for p in required) + (f" {rest}" if optional else "")
        elif optional:
            starts = []
            for k, p in enumerate(optional):
                after = f" {name}-rest{k + 1}" if k + 1 < len(optional) else ""
                starts.append(member[p] + after)
            body = "(" + " | ".join(starts) + ")?"
        else:
            body = ""
        return self._rule(name, f'"{{" {body} "}}"')

    def _converted(self, schema: dict[str, Any], name: str) -> str:
        from llama_cpp.llama_grammar import SchemaConverter

        if self._converter is None:
            self._converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        resolved = self._converter.resolve_refs(schema, "")
        return self._converter.visit(resolved, name)

    def _rule(self, name: str, body: str) -> str:
        self.rules[name] = body
        return name


def choice_grammar(tools: Sequence[Tool], said: str = "") -> str:
    """The GBNF that makes the model either call one of `tools` validly or answer directly;
    `said`, the user's message, is offered as a whole for text arguments."""
    return Grammar(said).build(tools)


def choice_tokens(tools: Sequence[Tool]) -> int:
    """Tokens enough for the longest choice the grammar allows (a token is at least a byte), so a
    choice is never cut short; CHOICE_TOKENS where a schema leaves it unbounded."""
    longest = len('{"tool": "none"}')
    for tool in tools:
        arguments = _longest(tool.parameters)
        if arguments is None:
            return CHOICE_TOKENS
        longest = max(longest, len(f'{{"tool": {json.dumps(tool.name)}, "arguments": }}'.encode()) + arguments)
    return longest


def _longest(schema: dict[str, Any]) -> int | None:
    """Bytes of the longest JSON `Grammar` writes for `schema`; None where it is unbounded."""
    if "enum" in schema:
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "string" and "maxLength" in schema:
        return 2 + 4 * int(schema["maxLength"])
    if kind == "integer" and "minimum" in schema and "maximum" in schema:
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "object" and schema.get("additionalProperties") is False:
        total = 2
        for name, prop in schema.get("properties", {}).items():
            value = _longest(prop)
            if value is None:
                return None
            total += len(json.dumps(name).encode()) + 4 + value
        return total
    return None


def parse_choice(text: str, tools: Sequence[Tool]) -> ToolCall | None:
    """The call the model chose (None: answer directly). Raises ValueError for output that is
    not a call to one of `tools` with arguments valid for its schema."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("tool"), str):
        raise ValueError(f"not a tool choice: {text[:200]!r}")
    if data["tool"] == NO_TOOL:
        return None
    return checked_call(data["tool"], data.get("arguments", {}), tools)


def checked_call(name: str, arguments: Any, tools: Sequence[Tool], call_id: str = "call_0") -> ToolCall:
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        raise ValueError(f"no tool {name!r} is offered")
    if not isinstance(arguments, dict):
        raise ValueError(f"{name}: arguments are not an object")
    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"{name}: {exc.message}") from exc
    return ToolCall(name, arguments, call_id)


async def choose(
    engine: Engine,
    messages: Sequence[ChatMessage],
    tools: Sequence[Tool],
    said: str = "",
    tags: frozenset[str] = frozenset(),
    named: asyncio.Future[Tool] | None = None,
) -> ToolCall | None:
    """Let the model choose a tool or none: through OpenAI's `tools` field where the server
    honours it, else under the choice grammar. An invalid choice is logged and means none.
    `tags` say whose messages the prompt holds, for an engine that keeps its state; `named`
    gets the tool as soon as its name is written, before its arguments are."""
    if "tools" in engine.features:
        options = GenerationOptions(
            max_tokens=CHOICE_TOKENS, temperature=0.0, tools=tuple(t.openai() for t in tools), tags=tags
        )
        result = await engine.chat(messages, options)
        if not result.tool_calls:
            return None
        first = result.tool_calls[0]
        function = first.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
            return checked_call(str(function.get("name")), arguments, tools, str(first.get("id") or "call_0"))
        except ValueError as exc:
            log.warning("the model's tool call was refused: %s", exc)
            return None
    text, finish = await choice_text(engine, messages, tools, said, tags, named)
    try:
        return parse_choice(text, tools)
    except ValueError as exc:
        log.warning("the model's tool choice was not usable (%s): %s", finish, exc)
        return None


async def choice_text(
    engine: Engine,
    messages: Sequence[ChatMessage],
    tools: Sequence[Tool],
    said: str = "",
    tags: frozenset[str] = frozenset(),
    named: asyncio.Future[Tool] | None = None,
) -> tuple[str, str | None]:
    """The choice the model writes under the grammar (`{"tool": ...}`), and why it ended.

    An engine that continues a written prefix is asked for the tool's name alone, after
    `{"tool": "`: choosing none then takes one decoding step where the whole choice took seven.
    A tool's arguments follow in a second request that continues the first."""
    if "prefix" not in engine.features:
        options = GenerationOptions(
            max_tokens=choice_tokens(tools), temperature=0.0, grammar=choice_grammar(tools, said), tags=tags
        )
        result = await engine.chat(messages, options)
        return result.text, result.finish_reason
    names = [NO_TOOL, *(t.name for t in tools)]
    written = CHOICE_OPENED
    options = GenerationOptions(
        max_tokens=max(len(n.encode()) for n in names) + 1,
        temperature=0.0,
        grammar="root ::= " + " | ".join(_literal(n) for n in names),
        prefix=written,
        tags=tags,
    )
    result = await engine.chat(messages, options)
    tool = next((t for t in tools if t.name == result.text), None)
    if tool is None:  # none, or a name cut short
        return written + result.text + '"}', result.finish_reason
    if named is not None and not named.done():
        named.set_result(tool)
    written += tool.name + '", "arguments": '
    if not tool.parameters.get("properties"):
        return written + "{}}", result.finish_reason
    longest = _longest(tool.parameters)
    options = replace(
        options,
        max_tokens=CHOICE_TOKENS if longest is None else longest + 1,
        grammar=Grammar(said).arguments(tool),
        prefix=written,
    )
    result = await engine.chat(messages, options)
    return written + result.text, result.finish_reason


def tools_prompt(tools: Sequence[Tool]) -> str:
    """The part of the system prompt that lists the tools and how to call them."""
    lines = []
    for tool in tools:
        args = ", ".join(
            f'"{name}": {_placeholder(prop)}' for name, prop in tool.parameters.get("properties", {}).items()
        )
        lines.append(f"- {tool.name}: {tool.description}. Arguments: {{{args}}}")
    return "\n".join(lines)


def examples(tools: Sequence[Tool]) -> list[ChatMessage]:
    """Earlier turns showing the model when to call which tool, and when none: messages answered
    directly, then the tools' examples (the message itself a text argument), taking turns
    between tools; the tools come last, as a small model follows the latest turns most."""
    turns: list[tuple[str, dict[str, Any]]] = [(example, {"tool": NO_TOOL}) for example in NO_TOOL_EXAMPLES]
    per_tool = []
    for tool in tools:
        properties, required = tool.parameters.get("properties", {}), tool.parameters.get("required", [])
        free_text = TEXT in properties and "enum" not in properties[TEXT]
        if set(required) - {TEXT} or (required and not free_text):
            continue  # arguments an example cannot fill in
        calls = [{"tool": tool.name, "arguments": {TEXT: e} if free_text else {}} for e in tool.examples]
        per_tool.append(list(zip(tool.examples, calls, strict=True)))
    for round_ in itertools.zip_longest(*per_tool):
        turns += [turn for turn in round_ if turn is not None]
    messages = []
    for said, choice in turns:
        messages += [ChatMessage("user", said), ChatMessage("assistant", json.dumps(choice, ensure_ascii=False))]
    return messages


def _placeholder(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " or ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
    if prop.get("type") == "integer":
        return f"<number {prop.get('minimum', '')}-{prop.get('maximum', '')}>"
    return f"<{prop.get('description') or prop.get('type', 'value')}>"


# -- running calls ----------------------------------------------------------------------------


class RateLimit:
    """At most `per_minute` events per key in any 60 seconds."""

    def __init__(self, per_minute: Callable[[], int]) -> None:
        self._per_minute = per_minute
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        seen = self._seen[key]
        while seen and now - seen[0] >= 60.0:
            seen.popleft()
        if len(seen) >= self._per_minute():
            return False
        seen.append(now)
        return True


@dataclass
class Outcome:
    """What a call gave: the reply, and whether it stands for the answer shown to the user."""

    reply: Reply
    final: bool = False


class Toolbox:
    """The tools on offer (commands, then MCP servers'), and the loop that lets the model use them."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.tools: dict[str, Tool] = {}
        self.rate = RateLimit(lambda: context.settings.tool_rate_per_minute)
        self._background: set[asyncio.Task[None]] = set()

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools or tool.name == NO_TOOL:
            log.error("tool %s is already offered; ignored", tool.name)
            return
        self.tools[tool.name] = tool

    def offered(self, request: Request) -> list[Tool]:
        """The tools this request may use: no admin tool for a non-admin, no tool that changes
        something where nobody can confirm it."""
        return [
            t
            for t in self.tools.values()
            if (request.is_admin or not t.admin) and (not t.changes or request.confirm is not None)
        ]

    async def call(self, tool: Tool, call: ToolCall, request: Request) -> Outcome:
        """Run one call as the asker: refused for a non-admin, asked for confirmation when it
        changes something, bounded in time, logged. Never raises."""
        who = f"{request.author_id} ({request.transport} {request.guild_id}/{request.channel_id})"
        shown = tool.shown(call.arguments)
        if tool.admin and not request.is_admin:
            log.warning("tool %s refused for non-admin %s", tool.name, who)
            return Outcome(Reply(_("{call} is for admins only, so I did not run it.", call=shown), failed=True), True)
        if tool.changes:
            if request.confirm is None:
                return Outcome(
                    Reply(_("I cannot ask you to confirm {call} here, so I did not run it.", call=shown), failed=True),
                    True,
                )
            confirmed = await request.confirm(_("Run {call}?", call=shown))
            log.info("tool %s for %s: %s", tool.name, who, "confirmed" if confirmed else "not confirmed")
            if not confirmed:
                return Outcome(Reply(_("Not confirmed: nothing was changed ({call}).", call=shown), failed=True), True)
        started = time.monotonic()
        timeout = self.context.settings.tool_timeout
        try:
            async with asyncio.timeout(timeout):
                reply = await tool.run(replace(request, tool_call=True), call.arguments)
        except TimeoutError:
            reply = Reply(
                _("{name} did not answer within {seconds} s.", name=tool.name, seconds=f"{timeout:g}"), failed=True
            )
        except Exception as exc:  # an MCP server that died: a short error for this call
            log.warning("tool %s failed: %s", tool.name, exc)
            reply = Reply(_("{name} failed: {error}", name=tool.name, error=str(exc)[:200]), failed=True)
        log.info(
            "tool call by %s: %s %s -> %s in %.2f s%s",
            who,
            tool.name,
            json.dumps(call.arguments, ensure_ascii=False)[:500],
            "a stream" if reply.stream is not None else f"{len(reply.text)} chars",
            time.monotonic() - started,
            " (failed)" if reply.failed else "",
        )
        return Outcome(reply, final=tool.answers or reply.failed)

    async def answer(self, request: Request, system_prompt: str, options: GenerationOptions | None = None) -> Reply:
        """Answer `request` as the next turn of its conversation, letting the model call tools
        first. With no tool on offer (or tools off), exactly `converse`."""
        ctx = self.context
        tools = self.offered(request) if ctx.settings.tools else []
        if not tools or not ({"tools", "grammar"} & ctx.engine.features) or request.tool_call:
            return await ctx.converse(request, system_prompt, options)
        options = options or ctx.options()
        conversation_id, history, options = await ctx.turn(request, system_prompt, options)
        reply = Reply()
        reply.stream = self._loop(request, system_prompt, history, tools, options, conversation_id, reply)
        return reply

    def _choice_prompt(self, system_prompt: str, tools: Sequence[Tool]) -> str:
        return self.context.prompts.render("tools_system", system=system_prompt, tools=tools_prompt(tools))

    def _choice_messages(
        self, system_prompt: str, tools: Sequence[Tool], history: Sequence[ChatMessage]
    ) -> list[ChatMessage]:
        return [ChatMessage("system", self._choice_prompt(system_prompt, tools)), *examples(tools), *history]

    async def _loop(
        self,
        request: Request,
        system_prompt: str,
        history: list[ChatMessage],
        tools: list[Tool],
        options: GenerationOptions,
        conversation_id: int,
        reply: Reply,
    ) -> AsyncIterator[str]:
        ctx = self.context
        done: list[ChatMessage] = []  # this answer's calls and their results
        seen: set[str] = set()
        called: set[str] = set()  # the names of the tools this answer called
        native = "tools" in ctx.engine.features  # the server's own tool calling: its template shows the tools
        plain = [ChatMessage("system", system_prompt), *history]
        for _round in range(ctx.settings.tool_max_calls):
            # A tool that changes something is offered only while no tool result is in the prompt.
            offer = tools if not done else [t for t in tools if not t.changes]
            if not offer:
                break
            messages = [*plain, *done] if native else [*self._choice_messages(system_prompt, offer, history), *done]
            # The status line shows as soon as the tool's name is written, not its arguments.
            # A tool this answer called before gets no early line: the same call again is not run.
            named: asyncio.Future[Tool] = asyncio.get_running_loop().create_future()
            choice = asyncio.create_task(choose(ctx.engine, messages, offer, request.text, options.tags, named))
            announced = False
            try:
                await asyncio.wait({choice, named}, return_when=asyncio.FIRST_COMPLETED)
                announced = named.done() and named.result().name not in called
                if announced:
                    yield _status(named.result())
                call = await choice
            except EngineError as exc:
                log.warning("tool choice failed: %s", exc)
                break
            finally:
                choice.cancel()  # done already, unless the answer was abandoned meanwhile
            key = json.dumps([call.name, call.arguments], sort_keys=True) if call else ""
            if call is None or key in seen:
                break
            if not self.rate.allow(request.author_id):  # answered without the call
                log.warning("tool rate limit reached for %s; %s not called", request.author_id, call.name)
                break
            seen.add(key)
            called.add(call.name)
            tool = self.tools[call.name]
            if not (announced and named.result() is tool):
                yield _status(tool)
            outcome = await self.call(tool, call, request)
            if outcome.reply.empty:  # e.g. /ask found nothing for "tell me a joke": just chat
                break
            if outcome.final:
                shown = []
                async for piece in _pieces(outcome.reply):
                    shown.append(piece)
                    yield piece
                await ctx.remember_answer(conversation_id, "".join(shown), reply)
                self._read_ahead(system_prompt, tools, history, "".join(shown), reply, options.tags)
                return
            result = "".join([piece async for piece in _pieces(outcome.reply)])
            done += [call.message(), ChatMessage("tool", result[:RESULT_CHARS], tool_call_id=call.id)]
        answer = []
        async for piece in ctx.remember(conversation_id, ctx.engine.stream([*plain, *done], options), reply):
            answer.append(piece)
            yield piece
        self._read_ahead(system_prompt, tools, history, "".join(answer), reply, options.tags)

    def _read_ahead(
        self,
        system_prompt: str,
        tools: Sequence[Tool],
        history: Sequence[ChatMessage],
        answer: str,
        reply: Reply,
        tags: frozenset[str],
    ) -> None:
        """Once an answer is stored, have an engine that batches and keeps states read the
        conversation's next choice prompt up to the next message, in the background: the next
        turn's choice then reads only that message. A failure costs only that head start."""
        engine = self.context.engine
        if reply.answer_id is None or "tools" in engine.features or "batch" not in engine.features:
            return
        messages = self._choice_messages(system_prompt, tools, [*history, ChatMessage("assistant", answer.strip())])

        async def read() -> None:
            try:
                await engine.chat(messages, GenerationOptions(max_tokens=1, temperature=0.0, tags=tags))
            except EngineError as exc:
                log.debug("reading ahead for the next tool choice failed: %s", exc)

        task = asyncio.create_task(read())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def idle(self) -> None:
        """Wait until no read-ahead is running."""
        while self._background:
            await asyncio.wait(set(self._background))
            await asyncio.sleep(0)  # their done callbacks take them out of the set

    async def close(self) -> None:
        """Stop reading ahead (before the engine closes)."""
        for task in list(self._background):
            task.cancel()
        await self.idle()


def _status(tool: Tool) -> str:
    """The line that says a tool is running."""
    return STATUS_PREFIX + _(tool.status or RUNNING, name=tool.name) + "\n"


async def _pieces(reply: Reply) -> AsyncIterator[str]:
    """A tool's reply as text pieces. A command's stream is already guarded by the router (each
    piece within QUILL_PLUGIN_TIMEOUT); an MCP call is whole once `Tool.run` returned."""
    if reply.stream is None:
        yield reply.text
        return
    async for piece in reply.stream:
        yield piece
