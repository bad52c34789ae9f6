"""The tool loop (bot/tools.py) on the default model, measured in one run:

1. overhead on replies that call no tool: /chat with tools on against tools off, the same
   messages in conversations of their own, one engine (target: <= 1.05x);
2. time to first visible output when a tool is called (the status line) and to the first piece
   of the tool's answer, against a plain reply's first piece;
3. validity of the model's choices under the choice grammar over 50 varied requests in English
   and Chinese: every one parseable JSON and valid for the chosen tool's schema (target: 100 %),
   and how many chose the tool the request calls for (EXPECTED).

    python -m bench.tools [--runs 3] [--requests 50] [--mode batched|single]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path

import jsonschema

from bench.common import bench_settings, machine_note, median, timed
from bot.api import Request
from bot.app import Quill
from bot.engine import ChatMessage
from bot.tools import NO_TOOL, STATUS_PREFIX, choice_text, examples

# Messages a person answers without a tool, a round of four (English and Chinese) per run: each
# is new to the engine, as a message repeated from an earlier run would be served from its saved
# state and read by neither side. Plain variety, not a tag such as "(#2)" that sways the choice.
SMALL_TALK = [
    ("Hi! How are you today?", "Thanks, that was helpful.", "你好！今天过得怎么样？", "谢谢你的帮助。"),
    ("Write a haiku about the sea.", "Good morning, everyone!", "早上好，大家！", "写一首关于大海的俳句。"),
    ("That sounds great, see you later.", "Tell me something nice.", "听起来不错，回头见。", "周末愉快！"),
    ("Have a nice weekend!", "I like your answers.", "我喜欢你的回答。", "给我讲点开心的事吧。"),
    ("Congratulations on the launch!", "Write a limerick about a cat.", "恭喜发布成功！", "写一首关于猫的小诗。"),
]
GUIDE = """# Deploying

Staging deploys run from the orange pipeline button in Jenkins.

Production deploys need two approvals and happen on Tuesdays only."""
REQUESTS = [
    "How do staging deploys run in our team?",
    "What is our policy for production releases?",
    "Who approves a production deploy?",
    "What time is it?",
    "What's the date today?",
    "Summarize the last 5 hours of this channel.",
    "Give me a summary of the last 50 messages.",
    "Translate 'good morning' into French.",
    "Please translate this to German: the build is green.",
    "What happened here since the last digest?",
    "List the documents in the knowledge base.",
    "Remove the document called Style guide.",
    "Forget everything you know about me.",
    "Erase this channel's messages.",
    "Schedule the digest every day at 9.",
    "Turn moderation classification on.",
    "Hello there!",
    "Thanks a lot!",
    "Tell me a joke.",
    "Write a short poem about autumn.",
    "How do I reset my password for the VPN?",
    "Where is the onboarding checklist?",
    "Can you explain what a mutex is?",
    "What did we decide about the release date?",
    "Good night!",
    "我们团队的测试环境部署是怎么运行的？",
    "生产环境发布需要谁批准？",
    "我们的报销流程是怎样的？",
    "现在几点了？",
    "今天是几号？",
    "总结一下这个频道最近五个小时的消息。",
    "帮我总结最近五十条消息。",
    "把“早上好”翻译成法语。",
    "请把这句话翻译成英文：构建通过了。",
    "上次摘要以来这里发生了什么？",
    "知识库里有哪些文档？",
    "删除名为风格指南的文档。",
    "忘记你知道的关于我的一切。",
    "删除这个频道的消息。",
    "每天九点发布摘要。",
    "打开审核分类。",
    "你好！",
    "非常感谢！",
    "讲个笑话吧。",
    "写一首关于秋天的短诗。",
    "VPN 密码怎么重置？",
    "新人入职清单在哪里？",
    "能解释一下什么是互斥锁吗？",
    "我们关于发布日期的决定是什么？",
    "晚安！",
]


# The tool each request calls for, the same for its English and its Chinese form: REQUESTS[i]
# and REQUESTS[i + 25] ask the same thing.
EXPECTED = [
    *("ask", "ask", "ask", "time", "time", "summarize", "summarize", "translate", "translate", "digest"),
    *("kb-list", "kb-remove", "forget", "forget", "schedule", "moderation", "none", "none", "none", "none"),
    *("ask", "ask", "none", "ask", "none"),
] * 2


async def confirm_no(question: str) -> bool:
    return False


def request(text: str, channel: str) -> Request:
    return Request("console", channel, "bench", text, author_name="bench", is_admin=True, confirm=confirm_no)


async def chat(app: Quill, text: str, channel: str) -> tuple[str, float, float]:
    """One reply, timed. Then, like a person reading it before writing again, wait for the
    work the answer left in the background (reading the next tool choice's prompt ahead), so
    that it never slows the next reply measured."""
    reply = await app.router.handle(request(text, channel))
    assert reply.stream is not None, reply.text
    result = await timed(reply.stream)
    await app.toolbox.idle()
    return result


async def overhead(plain: Quill, tools: Quill, runs: int) -> None:
    """Tools on against tools off on the same messages. The two prompts differ, so the replies
    do too, in length as well: besides the wall-time ratio, the two parts of the cost apart,
    the time to the first piece and the time per reply token after it."""
    ratios, skipped = [], 0
    first: dict[bool, list[float]] = {True: [], False: []}
    decoding: dict[bool, float] = {True: 0.0, False: 0.0}  # seconds after the first piece
    tokens: dict[bool, int] = {True: 0, False: 0}  # reply tokens after the first piece
    for run, talks in enumerate(SMALL_TALK[:runs]):
        times: dict[bool, list[float]] = {True: [], False: []}
        for i, text in enumerate(talks):
            channel = f"talk-{run}-{i}"
            with_tools = await chat(tools, text, channel)
            if with_tools[0].startswith(STATUS_PREFIX):  # the model called a tool: not a no-tool reply
                skipped += 1
                continue
            for on, (reply, seconds, total) in ((True, with_tools), (False, await chat(plain, text, channel))):
                times[on].append(total)
                first[on].append(seconds)
                decoding[on] += total - seconds
                tokens[on] += max(await plain.engine.count_tokens(reply) - 1, 0)
        if times[False]:
            ratios.append(sum(times[True]) / sum(times[False]))
    if not ratios:
        print("no-tool reply: the model called a tool for every message")
        return
    per_token = {on: 1000 * decoding[on] / max(tokens[on], 1) for on in (True, False)}
    print(
        f"no-tool reply, tools on / tools off (same messages, {len(first[True])} replies; target <= 1.05x): "
        f"wall time {median(ratios):.2f}x (median of {len(ratios)} runs; the replies differ in length); "
        f"first piece {median(first[True]):.3f} s against {median(first[False]):.3f} s; "
        f"after it {per_token[True]:.1f} against {per_token[False]:.1f} ms a token "
        f"({per_token[True] / per_token[False]:.2f}x); {skipped} replies that called a tool left out"
    )


async def first_output(plain: Quill, tools: Quill, runs: int) -> None:
    for app in (plain, tools):
        await app.router.handle(
            Request("console", "kb", "bench", f'/kb-add name:"Deploy guide" {GUIDE}', is_admin=True)
        )
    status, answer, plain_first, called = [], [], [], 0
    for run in range(runs):
        question = f"{REQUESTS[0] if run % 2 == 0 else REQUESTS[25]} (#{run + 1})"  # new to the engine
        reply = await tools.router.handle(request(question, "kb"))
        assert reply.stream is not None
        loop = asyncio.get_running_loop()
        start, seen = loop.time(), []
        async for piece in reply.stream:
            seen.append((loop.time() - start, piece))
        if seen and seen[0][1].startswith(STATUS_PREFIX) and len(seen) > 1:
            called += 1
            status.append(seen[0][0])
            answer.append(seen[1][0])
        plain_first.append((await chat(plain, question, f"kb-plain-{run}"))[1])
    if not status:
        print("first output with a tool: the model called no tool for the knowledge-base question")
        return
    print(
        f"first visible output when a tool is called: status line {median(status):.2f} s, first piece of the "
        f"tool's answer {median(answer):.2f} s; a plain reply's first piece {median(plain_first):.2f} s "
        f"({called} of {runs} questions called a tool)"
    )


async def validity(app: Quill, count: int) -> None:
    tools = app.toolbox.offered(request("x", "v"))
    system = app.toolbox._choice_prompt(app.context.prompts.render("chat_system", bot_name="quill"), tools)
    parsed = valid = right = 0
    chosen: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    for text, expected in list(zip(REQUESTS, EXPECTED, strict=True))[:count]:
        messages = [ChatMessage("system", system), *examples(tools), ChatMessage("user", text)]
        choice, finish = await choice_text(app.engine, messages, tools, text)
        try:
            data = json.loads(choice)
        except ValueError:
            print(f"  not JSON ({finish}): {text!r} -> {choice[:120]!r}")
            continue
        parsed += 1
        name = data.get("tool")
        chosen[name] += 1
        if name == expected:
            right += 1
        else:
            missed[f"{expected}->{name}"] += 1
        try:
            if name != NO_TOOL:
                jsonschema.validate(data["arguments"], app.toolbox.tools[name].parameters)
            valid += 1
        except (KeyError, jsonschema.ValidationError) as exc:
            print(f"  not valid: {text!r} -> {choice[:120]!r}: {exc}")
    n = min(count, len(REQUESTS))
    print(f"tool choices under the grammar: {parsed}/{n} parseable, {valid}/{n} schema-valid (target: 100 %)")
    print(f"  the tool the request calls for: {right}/{n}")
    print("  chosen: " + ", ".join(f"{name} {k}" for name, k in chosen.most_common()))
    print("  wrong (wanted->chosen): " + ", ".join(f"{pair} {k}" for pair, k in missed.most_common()))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=len(REQUESTS))
    parser.add_argument("--mode", choices=["batched", "single"], default="batched", help="QUILL_ENGINE_MODE")
    args = parser.parse_args()
    apps = []
    for tools_on in (False, True):
        each = bench_settings(
            engine_mode=args.mode,
            embeddings=False,
            max_reply_tokens=96,
            tools=tools_on,
            data_dir=Path(tempfile.mkdtemp(prefix="quill-bench-tools-")),
            # One bench user asks far more than a person would: no reply may be one the limit
            # kept from its tool.
            tool_rate_per_minute=10_000,
        )
        # An engine each: on a shared one, the side measured second would find the other's
        # saved state of the same prompt (tools on answers without a tool by the plain prompt).
        apps.append(await Quill.start(each))
    plain, tools = apps
    try:
        await validity(tools, args.requests)
        await overhead(plain, tools, args.runs)
        await first_output(plain, tools, args.runs)
    finally:
        for app in apps:
            await app.close()
    print(machine_note())


if __name__ == "__main__":
    asyncio.run(main())
