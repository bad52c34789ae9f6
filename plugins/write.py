"""Writing helper: proofread (a validated list of fixes), rewrite in a tone, shorten, expand, and
draft from bullet points; proofread and rewrite show a word diff of what changed.

Proofreading asks for grammar-constrained JSON (`chat_structured` with a bounded schema) and
applies only fixes whose `original` really occurs in the text, so a model's invention cannot
change words that were not there.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from bot.api import N_, ChatMessage, Command, Option, PluginContext, Reply, Request, _, hookimpl

MODES = ("proofread", "rewrite", "shorten", "expand", "draft")
TONES = ("formal", "friendly", "concise")
MAX_FIXES = 5
# JSON punctuation plus a generous count per bounded fix: the reply can always complete.
PROOFREAD_TOKENS = 32 + MAX_FIXES * 96
TEMPLATE_TOKENS = 24
USAGE = N_(
    "Usage: /write [tone:formal|friendly|concise] <proofread|rewrite|shorten|expand|draft> <text> "
    "(draft takes bullet points)"
)


class Fix(BaseModel):
    # No maxLength on the strings: llama.cpp's grammar samples several times slower with one.
    original: Annotated[str, StringConstraints(min_length=1)]
    correction: str
    reason: str


class Proofreading(BaseModel):
    fixes: list[Fix] = Field(max_length=MAX_FIXES)


_WORDS = re.compile(r"\S+\s*|\s+")  # each word with the spacing after it


def word_diff(before: str, after: str) -> str:
    """What changed, word by word, like `git diff --word-diff`: [-removed-]{+added+}."""
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append("".join(a[i1:i2]))
            continue
        removed, added = "".join(a[i1:i2]), "".join(b[j1:j2])
        if removed.strip():
            out.append(f"[-{removed.strip()}-]")
        if added.strip():
            out.append(f"{{+{added.strip()}+}}")
        tail = added or removed
        out.append(tail[len(tail.rstrip()) :])  # the spacing that followed the change
    return "".join(out)


def apply_fixes(text: str, fixes: list[Fix]) -> tuple[str, list[Fix]]:
    """The text with each fix applied once, and the fixes that were (an `original` that is not
    in the text, or that equals its correction, is dropped)."""
    applied = []
    for fix in fixes:
        if fix.original != fix.correction and fix.original in text:
            text = text.replace(fix.original, fix.correction, 1)
            applied.append(fix)
    return text, applied


async def _too_long(ctx: PluginContext, system: str, text: str, reply_tokens: int) -> Reply | None:
    """A clear refusal when the text and the reply cannot fit the model's context together."""
    used = await ctx.engine.count_tokens(system) + await ctx.engine.count_tokens(text)
    room = ctx.engine.n_ctx - reply_tokens - TEMPLATE_TOKENS
    if used <= room:
        return None
    refusal = _(
        "That text is too long for one pass ({used} tokens with the instructions; {room} fit "
        "beside the reply in this model's context, QUILL_N_CTX). Please send it in parts.",
        used=used,
        room=max(room, 0),
    )
    return Reply(refusal, failed=True)


async def write(ctx: PluginContext, request: Request) -> Reply:
    mode = str(request.options.get("mode", ""))
    text = request.text
    if not mode:
        first, _sep, rest = text.partition(" ")
        mode, text = first.lower(), rest.strip()
    tone = str(request.options.get("tone", "")) or ("concise" if mode == "draft" else "formal")
    if mode not in MODES or not text:
        return Reply(_(USAGE), failed=True)
    system = ctx.prompts.render("write_system", mode=mode, tone=tone)
    messages = [ChatMessage("system", system), ChatMessage("user", text)]
    if mode == "proofread":
        if refusal := await _too_long(ctx, system, text, PROOFREAD_TOKENS):
            return refusal
        result = await ctx.engine.chat_structured(
            messages, Proofreading, ctx.options(max_tokens=PROOFREAD_TOKENS, temperature=0.0)
        )
        corrected, applied = apply_fixes(text, result.fixes)
        if not applied:
            return Reply(_("No fixes found."))
        fixes = "\n".join(f"{i}. “{f.original}” → “{f.correction}” ({f.reason})" for i, f in enumerate(applied, 1))
        diff = word_diff(text, corrected)
        return Reply(
            _(
                "Fixes:\n{fixes}\n\nChanges:\n{diff}\n\nCorrected:\n{corrected}",
                fixes=fixes,
                diff=diff,
                corrected=corrected,
            )
        )
    options = ctx.options()
    if refusal := await _too_long(ctx, system, text, options.max_tokens):
        return refusal
    result = (await ctx.engine.chat(messages, options)).text.strip()
    if not result:
        return Reply(_("The model gave an empty reply; please try again."), failed=True)
    if mode == "rewrite":
        return Reply(_("{result}\n\nChanges:\n{diff}", result=result, diff=word_diff(text, result)))
    return Reply(result)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "write",
            N_(
                "writing help: proofread (list of fixes and a diff), rewrite in a tone (with a diff), "
                "shorten, expand, or draft from bullet points"
            ),
            write,
            "<proofread|rewrite|shorten|expand|draft> <text>",
            options=(
                Option("mode", N_("proofread, rewrite, shorten, expand or draft"), choices=MODES, closed=True),
                Option("tone", N_("formal, friendly or concise"), choices=TONES, closed=True),
            ),
        )
    )
