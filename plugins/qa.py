"""Q&A / help desk: answers from the team's own material (knowledge base, past messages), with
its sources cited.

Retrieval is multilingual search in the database (`ctx.search`); whether anything relevant
exists is decided by the search's relevance floor (QUILL_QA_MIN_RELEVANCE), not by the model:
with no hit above it, the answer says so and the model is never asked. The answer is a turn of
the place's conversation (`ctx.converse`), so follow-up questions keep their memory; the list
of sources (document, section, a short quote; or a message with its link) is appended after
it, not stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from bot.api import (
    N_,
    Command,
    Hit,
    Option,
    Page,
    Place,
    PluginContext,
    PluginSettings,
    Redirect,
    Reply,
    Request,
    Section,
    ToolSpec,
    WebPage,
    WebRequest,
    _,
    hookimpl,
    message_link,
    ngettext,
    relevant,
)

NAME_CHARS = 100
NOTHING_FOUND = N_(
    "I found nothing about that in this team's knowledge base or past messages, so I won't guess. "
    "An admin can add documents with /kb-add name:<name> <text>."
)
ADD_USAGE = "/kb-add name:<name> <text>"
TEMPLATES = Path(__file__).parent / "templates" / "qa"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TESTER_HITS = 20


class QaSettings(PluginSettings):
    """QUILL_QA_*: how much of the knowledge base an answer cites and reads."""

    max_sources: int = Field(4, ge=1, le=20, description="Most sources cited per answer.")
    source_tokens: int = Field(
        768, ge=64, description="Tokens of retrieved text put in the prompt (neighbouring passages fill what is left)."
    )


def is_question(text: str) -> bool:
    """A message that asks rather than tells: it ends with a question mark (ASCII or full-width)."""
    return text.rstrip().endswith(("?", "？"))


def source_label(hit: Hit, place: Place) -> str:
    """How a source is named in the prompt and under the answer: a document's name, or a
    message's author, date and id (a jump link on Discord)."""
    if hit.kind == "doc":
        if hit.heading and hit.heading != hit.name:
            return _("document “{name}” › {heading}", name=hit.name, heading=hit.heading)
        return _("document “{name}”", name=hit.name)
    where = message_link(place, hit.message_id, hit.channel_id) or _("message {id}", id=hit.message_id)
    if hit.created_at:
        return _("{author} on {date}, {where}", author=hit.author, date=f"{hit.created_at:%Y-%m-%d}", where=where)
    return _("{author}, {where}", author=hit.author, where=where)


async def fit_sources(ctx: PluginContext, hits: list[Hit]) -> list[str]:
    """Each hit's text, cut so that all of them together stay within QUILL_QA_SOURCE_TOKENS,
    then with the passages beside it in its document where the tokens left allow."""
    total = ctx.config(QaSettings).source_tokens
    budget = total // len(hits)
    texts, used = [], 0
    for hit in hits:
        body = hit.text
        tokens = await ctx.engine.count_tokens(body)
        if tokens > budget:  # cut proportionally; a cut passage is still a quotable excerpt
            body = body[: max(1, len(body) * budget // tokens)].rstrip() + " …"
        texts.append(body)
        used += min(tokens, budget)
    return await with_neighbours(ctx, hits, texts, total - used)


async def with_neighbours(ctx: PluginContext, hits: list[Hit], texts: list[str], left: int) -> list[str]:
    """Each source's text with the whole passage before and after it in its document, best
    hits first, each one only if it fits in the `left` tokens, so the model reads what leads up
    to a hit and follows it. They join the source's text (the document it cites), not the list
    of citations."""
    around = await ctx.search.neighbours(hits)
    joined = []
    for body, (before, after) in zip(texts, around, strict=True):
        parts = [body]
        for side, first in ((before, True), (after, False)):
            tokens = await ctx.engine.count_tokens(side)  # 0 for "" (no such passage)
            if side and tokens <= left:
                left -= tokens
                parts.insert(0 if first else len(parts), side)
        joined.append("\n\n".join(parts))
    return joined


async def ask(ctx: PluginContext, request: Request) -> Reply:
    if not request.text:
        return Reply(_("Usage: /ask <question>: answered from the knowledge base and past messages."), failed=True)
    hits = await ctx.search.search(
        request.text,
        *request.place,
        ctx.config(QaSettings).max_sources,
        min_relevance=ctx.settings.qa_min_relevance,
    )
    # A past message that is itself a question (someone's earlier /ask, say) answers nothing, nor
    # does the asker's own message, stored before a tool call of the chat runs this search: found
    # by its id where the transport gives one, as the model's words for the question may differ.
    question = request.text.strip()
    hits = [h for h in hits if not (h.kind == "message" and (is_question(h.text) or _asked(h, request, question)))]
    if not hits:
        return Reply(_(NOTHING_FOUND), empty=True)
    labels = [source_label(h, request.place) for h in hits]
    texts = await fit_sources(ctx, hits)
    sources = [
        {"number": i, "label": label, "text": body}
        for i, (label, body) in enumerate(zip(labels, texts, strict=True), 1)
    ]
    system = ctx.prompts.render("qa_system", bot_name=ctx.settings.bot_name, sources=sources)
    reply = await ctx.converse(request, system)
    assert reply.stream is not None
    footer = (
        "\n\n"
        + _("Sources:")
        + "\n"
        + "\n".join(
            f"[{i}] {label}" + (f": “{hit.quote}”" if hit.quote else "")
            for i, (label, hit) in enumerate(zip(labels, hits, strict=True), 1)
        )
    )
    reply.stream = _then(reply.stream, footer)
    return reply


def _asked(hit: Hit, request: Request, question: str) -> bool:
    """Whether `hit` is the message that asked."""
    return hit.text.strip() == question or (request.message_id is not None and hit.message_id == request.message_id)


async def _then(pieces: AsyncIterator[str], tail: str) -> AsyncIterator[str]:
    async for piece in pieces:
        yield piece
    yield tail


async def kb_add(ctx: PluginContext, request: Request) -> Reply:
    name = str(request.options["name"])
    if request.attachments:
        return await _add_files(ctx, request, name)
    if not request.text:
        return Reply(_("Usage: {usage}", usage=ADD_USAGE), failed=True)
    count = await ctx.search.add_document(*request.place, name, request.text, added_by=request.author_id)
    return Reply(_("Added “{name}” to the knowledge base ({passages}).", name=name, passages=_passages(count)))


async def _add_files(ctx: PluginContext, request: Request, name: str) -> Reply:
    """Several attached files at once: each a document named `<name>/<file name>`; a file that
    is empty or too long is named with the reason, and the others are added."""
    lines, failed = [], False
    for filename, body in request.attachments:
        doc = f"{name}/{filename}"[-NAME_CHARS:]
        if not body.strip() or len(body) > ctx.settings.max_document_chars:
            if not body.strip():
                lines.append(_("- {file}: not added, it is empty", file=filename))
            else:
                limit = ctx.settings.max_document_chars
                lines.append(
                    _("- {file}: not added, over QUILL_MAX_DOCUMENT_CHARS ({limit})", file=filename, limit=limit)
                )
            failed = True
            continue
        count = await ctx.search.add_document(*request.place, doc, body, added_by=request.author_id)
        lines.append(f"- “{doc}” ({_passages(count)})")
    return Reply(_("Knowledge base:") + "\n" + "\n".join(lines), failed=failed)


async def kb_list(ctx: PluginContext, request: Request) -> Reply:
    docs = await ctx.search.list_documents(*request.place)
    if not docs:
        return Reply(_("The knowledge base is empty. An admin adds documents with {usage}", usage=ADD_USAGE))
    return Reply(_("Knowledge base:") + "\n" + "\n".join(f"- {name} ({_passages(n)})" for name, n in docs))


async def kb_remove(ctx: PluginContext, request: Request) -> Reply:
    name = request.text
    if not name:
        return Reply(_("Usage: /kb-remove <name> (/kb-list shows the names)"), failed=True)
    if await ctx.search.remove_document(*request.place, name):
        return Reply(_("Removed “{name}” from the knowledge base.", name=name))
    return Reply(_("There is no document named “{name}”. /kb-list shows them.", name=name), failed=True)


def _passages(count: int) -> str:
    return ngettext("{count} passage", "{count} passages", count)


@hookimpl
async def digest_sections(context: PluginContext, place: Place, since: datetime) -> Section | None:
    """The knowledge-base documents added (or replaced) in the place's guild since `since`."""
    docs = await context.search.documents_since(*place, since)
    if not docs:
        return None
    lines = [f"- {name} ({_passages(count)}), {added:%Y-%m-%d}" for name, count, added in docs]
    return Section(_("New in the knowledge base"), "\n".join(lines))


@hookimpl
def register_settings(register: Callable[[type], None]) -> None:
    register(QaSettings)


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            "ask",
            N_("answer a question from the team's knowledge base and past messages, citing sources"),
            ask,
            "<question>",
            tool=ToolSpec(
                answers=True,
                status=N_("searching the knowledge base…"),
                text="the question, in the user's words",
                examples=("What is our policy for production releases?", "我们的报销流程是怎样的？"),
            ),
        )
    )
    register(
        Command(
            "kb-add",
            N_(
                "add a document (pasted text or a text file) to the knowledge base /ask answers from; "
                "a document of the same name is replaced"
            ),
            kb_add,
            "<text>",
            admin=True,
            options=(Option("name", N_("document name"), required=True, max=NAME_CHARS),),
            document=True,
        )
    )
    register(
        Command(
            "kb-list",
            N_("list the knowledge base's documents"),
            kb_list,
            tool=ToolSpec(answers=True, status=N_("listing the knowledge base…")),
        )
    )
    register(
        Command(
            "kb-remove",
            N_("remove a document from the knowledge base"),
            kb_remove,
            "<name>",
            admin=True,
            tool=ToolSpec(changes=True, status=N_("removing a document…"), text="the document's name"),
        )
    )


# -- admin panel pages ----------------------------------------------------------------------


async def kb_page(ctx: PluginContext, request: WebRequest) -> Page | Redirect:
    """The knowledge base of a server: upload several files at once, list, view, delete, re-index."""
    place = request.place
    if request.method == "POST":
        action, name = request.form.get("action", ""), request.form.get("name", "")
        if action == "upload":
            lines = []
            for upload in request.files:
                doc = upload.name[:NAME_CHARS]
                count = await ctx.search.add_document(*place, doc, upload.text, added_by=request.user)
                lines.append(f"“{doc}” ({_passages(count)})")
            lines += [_("{file}: not added, {reason}", file=file, reason=reason) for file, reason in request.refused]
            if not lines:
                return Redirect(request.url(), _("Choose one or more text files first."), error=True)
            return Redirect(request.url(), _("Knowledge base:") + " " + "; ".join(lines), error=bool(request.refused))
        if action == "delete" and await ctx.search.remove_document(*place, name):
            return Redirect(request.url(), _("Removed “{name}” from the knowledge base.", name=name))
        if action == "reindex" and (count := await ctx.search.reindex(*place, name)) is not None:
            return Redirect(request.url(), _("Re-indexed “{name}” ({passages}).", name=name, passages=_passages(count)))
        return Redirect(request.url(), _("There is no document named “{name}”.", name=name), error=True)
    if doc := request.query.get("doc"):
        passages = await ctx.search.passages(*place, doc)
        if passages is None:
            return Redirect(request.url(), _("There is no document named “{name}”.", name=doc), error=True)
        return Page("document.html", {"name": doc, "passages": passages})
    docs = await ctx.search.documents_since(*place, EPOCH)
    limit = ctx.settings.max_document_chars
    return Page("kb.html", {"docs": docs, "limit": limit})


async def search_page(ctx: PluginContext, request: WebRequest) -> Page:
    """The search tester: the ranked passages and messages for a question, with their lexical,
    semantic and fused scores and whether they pass QUILL_QA_MIN_RELEVANCE, as /ask would see them."""
    question = request.query.get("q", "").strip()[: ctx.settings.max_input_chars]
    floor = ctx.settings.qa_min_relevance
    hits = await ctx.search.search(question, *request.place, TESTER_HITS) if question else []
    kept = {id(h) for h in relevant(hits, floor)}
    rows = [(h, id(h) in kept) for h in hits]
    return Page(
        "search.html", {"question": question, "rows": rows, "floor": floor, "semantic": ctx.semantic is not None}
    )


@hookimpl
def register_web_pages(register: Callable[[WebPage], None]) -> None:
    register(WebPage("kb", N_("Knowledge base"), kb_page, TEMPLATES, post=True))
    register(WebPage("search", N_("Search tester"), search_page, TEMPLATES))
