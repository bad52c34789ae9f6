"""Digest sections that need no model: open questions, decisions and action items, the most
discussed threads. Each item is a message people wrote, quoted and linked, found by explicit
markers in English and Chinese; `python -m bench.digest_quality` measures how well.

Only people's messages count: the bot's own answers are not the team's (an answer of the small
default model does not close a question).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from bot.api import Place, _, content_words, message_link, quote

# A later message answers a question only within this many messages and this long after it.
ANSWER_WINDOW = 30
ANSWER_HOURS = 24
# Content words (or Chinese bigrams) an answer must share with its question, at most.
ANSWER_OVERLAP = 2
# A message without a reply link joins the discussion of a recent one it shares a word with.
THREAD_WINDOW = 8
MIN_THREAD = 3


@dataclass(frozen=True)
class Said:
    """A person's message as the sections see it. `key` is the transport's message id where
    there is one (a Discord snowflake), else the stored row's id."""

    key: str
    author: str
    text: str
    at: datetime
    channel: str
    external_id: str | None = None
    reply_to: str | None = None
    mood: str = "neutral"

    @property
    def words(self) -> set[str]:
        return content_words(self.text)


@dataclass
class Thread:
    """A message and what followed it: replies on Discord, else later messages on its topic."""

    root: Said
    messages: list[Said] = field(default_factory=list)

    @property
    def people(self) -> int:
        return len({m.author for m in self.messages})

    @property
    def unhappy(self) -> int:
        return sum(m.mood == "negative" for m in self.messages)


# -- questions ---------------------------------------------------------------------------------

_URL = re.compile(r"https?://\S+")
_EN_ASKS = re.compile(
    r"^(who|what|when|where|why|how|which|whose|can|could|should|would|will|is|are|do|does|did|has|have|shall|may)\b",
    re.IGNORECASE,
)
_ZH_ASKS = re.compile(r"(谁|什么|怎么|为什么|哪里|哪个|哪儿|多少|几点|是否|有没有|能不能|可不可以|要不要|吗|呢)")


def is_question(text: str) -> bool:
    """A question mark outside links, or a sentence opened by a question word (English) or
    holding one (Chinese) and not closed by a full stop."""
    bare = unicodedata.normalize("NFKC", _URL.sub("", text)).strip()  # full-width marks become ? and !
    if "?" in bare:
        return True
    if bare.endswith((".", "。", "!")):
        return False
    return bool(_EN_ASKS.match(bare) or _ZH_ASKS.search(bare))


def answers(question: Said, later: Said) -> bool:
    """Whether `later` (someone else's) answers `question`: a reply to it, or, without a reply
    link elsewhere, a statement sharing its content words."""
    if later.reply_to is not None:
        return later.reply_to == question.key
    if is_question(later.text):
        return False
    words = question.words
    return len(words & later.words) >= min(ANSWER_OVERLAP, len(words)) > 0


def open_questions(messages: Sequence[Said]) -> list[Said]:
    """Questions that no one else answered afterwards."""
    found = []
    for i, question in enumerate(messages):
        if not is_question(question.text):
            continue
        deadline = question.at + timedelta(hours=ANSWER_HOURS)
        following = [
            m
            for m in messages[i + 1 :]
            if m.author != question.author and (m.reply_to == question.key or m.at <= deadline)
        ]
        replies = [m for m in following if m.reply_to == question.key]
        if not replies and not any(answers(question, m) for m in following[:ANSWER_WINDOW]):
            found.append(question)
    return found


# -- decisions and action items ------------------------------------------------------------------

_DAYS = r"(monday|tuesday|wednesday|thursday|friday|saturday|sunday|mon|tue|wed|thu|fri|tomorrow|tonight|eod|today)"
_MONTHS = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*"
DECISION_MARKERS = (
    re.compile(r"\b(we|i|team)( have| had)? (decided|agreed)\b|\bdecision\b|\bagreed\b", re.IGNORECASE),
    re.compile(r"\blet'?s\b|\blet us\b", re.IGNORECASE),
    re.compile(r"\b(i|we|you|they|he|she)( will|'ll| shall| are going to| am going to)\b", re.IGNORECASE),
    re.compile(r"\b(todo|to-do|action items?|deadline|due|eta)\b", re.IGNORECASE),
    re.compile(rf"\b(by|on|before|until|next) {_DAYS}\b|\bnext (week|month|sprint)\b", re.IGNORECASE),
    re.compile(rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b{_MONTHS} \d{{1,2}}\b|\b\d{{1,2}} {_MONTHS}\b", re.IGNORECASE),
    re.compile(r"决定|决议|定了|同意|确定|我们将|将于|将在|我来|负责|待办|截止|之前完成|前完成|计划|安排"),
    re.compile(r"下周|下个月|下星期|明天|后天|本周[一二三四五六日]|周[一二三四五六日]前|\d+月\d+[日号]"),
)


def is_decision(text: str) -> bool:
    """A statement (not a question) with a decision or action marker: "we decided", "let's",
    "I will", "TODO", a day or a date, "决定", "我们将", "下周", "截止"..."""
    return not is_question(text) and any(marker.search(text) for marker in DECISION_MARKERS)


def decisions(messages: Iterable[Said]) -> list[Said]:
    return [m for m in messages if is_decision(m.text)]


# -- threads -------------------------------------------------------------------------------------


def threads(messages: Sequence[Said]) -> list[Thread]:
    """Discussions, busiest first (messages, then people): on Discord a message and the replies
    chained to it; a message with no reply link joins the discussion of one of the last few
    messages by someone else that shares a content word with it."""
    by_key: dict[str, Thread] = {}
    ordered: list[Thread] = []
    for i, message in enumerate(messages):
        thread = by_key.get(message.reply_to) if message.reply_to else None
        if thread is None and message.reply_to is None:
            words = message.words
            for earlier in reversed(messages[max(0, i - THREAD_WINDOW) : i]):
                if earlier.author != message.author and earlier.reply_to is None and words & earlier.words:
                    thread = by_key[earlier.key]
                    break
        if thread is None:
            thread = Thread(message)
            ordered.append(thread)
        thread.messages.append(message)
        by_key[message.key] = thread
    busy = [t for t in ordered if len(t.messages) >= MIN_THREAD and t.people >= 2]
    return sorted(busy, key=lambda t: (len(t.messages), t.people), reverse=True)


# -- rendering -----------------------------------------------------------------------------------


def quoted(place: Place, message: Said) -> str:
    """The message quoted with its author, linked where the transport has links."""
    return quote(message.text, message.author, message_link(place, message.external_id, message.channel))


def bullets(place: Place, messages: Iterable[Said], limit: int) -> str:
    """Markdown bullets quoting the messages, newest last, with a count of those left out."""
    items = list(messages)
    lines = [f"- {quoted(place, m)}" for m in items[-limit:]]
    if len(items) > limit:
        lines.insert(0, _("({count} earlier not shown)", count=len(items) - limit))
    return "\n".join(lines)
